"""GGUF export of a merged model for llama.cpp / Ollama, written with the ``gguf`` package.

Two of llama.cpp's architectures, as ``convert_hf_to_gguf.py`` writes them: ``qwen3``
(Qwen3ForCausalLM) and ``llama`` (LlamaForCausalLM: Llama 2/3 shapes, SmolLM2); any other
``model_type`` is refused in one line. What goes into the file:

* model metadata: block count, context length, embedding / feed-forward length, head counts,
  key/value length (= ``head_dim``; Qwen3's is not ``hidden / heads`` in general), rope freq
  base, RMS-norm epsilon, file type; ``llama`` adds ``vocab_size`` and
  ``rope.dimension_count`` (= ``head_dim``, as ``LlamaModel.set_gguf_parameters`` does). Rope
  scaling is not exported (refused);
* the tokenizer (:mod:`reprotune.deploy.gguf_vocab`): ``gpt2``-style byte-level BPE with the
  pre-tokenizer llama.cpp must use (``qwen2`` for Qwen3, ``smollm`` or ``gpt-2`` for Llama),
  bos/eos/unk/pad ids, no automatic BOS;
* the chat template under ``tokenizer.chat_template`` plus ``reprotune.enable_thinking`` and
  ``reprotune.chat_template_sha256``, so the prompt format travels with the file;
* tensors renamed through ``gguf.get_tensor_name_map(arch, n)`` (token_embd,
  blk.N.attn_q/k/v/output, attn_q_norm/attn_k_norm (Qwen3), ffn_gate/up/down, attn_norm,
  ffn_norm, output_norm, and ``output`` only when the embeddings are not tied).

Q/K layout: llama.cpp permutes Q/K rows only for the ``llama`` architecture (HF's rotate-half
rope vs ggml's interleaved "normal" rope: within each head, row ``i`` of the first half and
row ``i`` of the second half become rows ``2i`` and ``2i+1``; K with the KV head count);
Qwen2/Qwen3 run ggml's NEOX rope, which *is* rotate-half, so their weights are written as they
are. transformers' GGUF loader agrees: its ``TENSOR_PROCESSORS`` reverse-permutes only
``llama`` and uses the identity for qwen3. Q8_0 blocks run along a row, so quantising the
permuted rows is the permutation of the quantised rows: the layer errors are the same.

Precision, following llama.cpp's converter: 1-D tensors (norms) stay F32; 2-D weights are F16
(``f16``) or Q8_0 (``q8_0``, blocks of 32 along a row; a row length not divisible by 32 falls
back to F16). Modules matching ``keep_full_precision`` stay F16 in a Q8_0 file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune.deploy.gguf_vocab import GGUFUnsupported, pre_tokenizer_name, write_tokenizer

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
ARCHS = ("qwen3", "llama")  # HF model_type = llama.cpp architecture name
KEY_ENABLE_THINKING = "reprotune.enable_thinking"
KEY_TEMPLATE_SHA = "reprotune.chat_template_sha256"
QTYPES = ("f16", "q8_0")

__all__ = ["ARCHS", "GGUF_FILE", "GGUFUnsupported", "QTYPES", "export_gguf", "load_exported",
           "read_gguf_summary"]


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFUnsupported("config has no rope_theta")
    if params.get("rope_type", "default") != "default":
        raise GGUFUnsupported(f"rope scaling {params.get('rope_type')!r} is not exported")
    return float(theta)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def rope_permute(w: Any, n_head: int) -> Any:
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half Q/K rows -> ggml's interleaved
    layout, per head (``n_head``: the KV head count for K). Works for weights and biases."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _prepare(hf_name: str, data: Any, config: Any, arch: str) -> Any:
    """The tensor as llama.cpp's ``arch`` reads it (Q/K rows permuted for ``llama``)."""
    if arch != "llama":
        return data
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return rope_permute(data, config.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return rope_permute(data, config.num_key_value_heads)
    return data


def _write_metadata(writer: Any, config: Any, arch: str, file_type: Any) -> None:
    import gguf

    writer.add_name(f"reprotune-{arch}")  # not the source path: identical input, identical bytes
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "llama":  # LlamaModel.set_gguf_parameters; transformers reads head_dim from it
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(_head_dim(config))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _keep(hf_name: str, keep_full_precision: Sequence[str]) -> bool:
    return any(frag in hf_name for frag in keep_full_precision)


def export_gguf(model_dir: str | Path, out_path: str | Path, *, qtype: str,
                keep_full_precision: Sequence[str], enable_thinking: bool,
                chat_template_sha256: str) -> dict[str, Any]:
    """Write ``model_dir`` (a plain HF Qwen3 or Llama model dir) as one GGUF file.

    Returns ``{"n_tensors", "tensor_types": {type: count}, "layer_errors": {module: rel}}``;
    layer errors (relative Frobenius error of W vs dequantised W) are given for Q8_0 tensors.
    Everything that can be refused is refused before the file is opened.
    """
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    arch = config.model_type
    if arch not in ARCHS:
        raise GGUFUnsupported(f"GGUF export supports model_type {' or '.join(map(repr, ARCHS))} "
                              f"only, got {arch!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not tokenizer.chat_template:
        raise GGUFUnsupported(f"{model_dir}: tokenizer has no chat template")
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    if not special.merges:
        raise GGUFUnsupported(f"{model_dir}/tokenizer.json: no BPE merges (not a BPE tokenizer?)")
    pre = pre_tokenizer_name(tokenizer, arch)
    _rope_theta(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", use_safetensors=True,
                                                 local_files_only=True)
    gguf_arch = gguf.MODEL_ARCH[arch.upper()]
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and tied)}
    unnamed = [k for k in state if names.get_name(k.rsplit(".", 1)[0]) is None]
    if unnamed:
        raise GGUFUnsupported(f"no llama.cpp {arch} name for tensor {unnamed[0]!r}")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf_arch])
    _write_metadata(writer, config, arch, file_type)
    write_tokenizer(writer, tokenizer, config, special.merges, pre)
    writer.add_chat_template(tokenizer.chat_template)
    writer.add_bool(KEY_ENABLE_THINKING, bool(enable_thinking))
    writer.add_string(KEY_TEMPLATE_SHA, chat_template_sha256)

    types: Counter[str] = Counter()
    errors: dict[str, float] = {}
    # tied: no `output` tensor, llama.cpp reuses token_embd
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        data = _prepare(hf_name, tensor.detach().float().numpy(), config, arch)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
            types["F32"] += 1
            continue
        q8 = (qtype == "q8_0" and not _keep(hf_name, keep_full_precision)
              and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0)
        if q8:
            qt = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(data, qt)
            writer.add_tensor(name, packed, raw_dtype=qt)
            deq = gguf.quants.dequantize(packed, qt).reshape(data.shape)
            errors[base] = float(np.linalg.norm(data - deq) / max(np.linalg.norm(data), 1e-30))
            types["Q8_0"] += 1
        else:
            writer.add_tensor(name, data.astype(np.float16))
            types["F16"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    n = sum(types.values())
    log.info("GGUF %s: %d tensors %s -> %s", qtype, n, dict(types), out_path)
    return {"n_tensors": n, "tensor_types": dict(sorted(types.items())), "layer_errors": errors}


def read_gguf_summary(path: str | Path) -> dict[str, Any]:
    """Metadata a consumer relies on, read from the file's header.

    With transformers' GGUF header reader, which counts the vocabulary instead of parsing
    49k tokens and merges into objects as ``gguf.GGUFReader`` does (seconds per file).
    """
    import gguf
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    arch = meta["general.architecture"]
    tokens = meta["tokenizer.ggml.tokens"]  # a count: string arrays are not read
    return {
        "architecture": arch,
        "block_count": meta.get(f"{arch}.block_count"),
        "key_length": meta.get(f"{arch}.attention.key_length"),
        "rope_dimension_count": meta.get(f"{arch}.rope.dimension_count"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "enable_thinking": meta.get(KEY_ENABLE_THINKING),
        "chat_template_sha256": meta.get(KEY_TEMPLATE_SHA),
        "n_vocab": tokens if isinstance(tokens, int) else len(tokens),
        "tensors": {t.name: {"shape": list(t.shape),
                             "type": gguf.GGMLQuantizationType(t.ggml_type).name}
                    for t in GgufHeader.from_file(str(path)).tensors},
    }


def load_exported(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an exported file, loaded back as the base stage loads any GGUF:
    transformers' GGUF loader with :mod:`reprotune.gguf_import`'s fixes (the pre-tokenizer
    ``tokenizer.ggml.pre`` names, ``head_dim`` from ``key_length``), dequantised to float32."""
    from reprotune.gguf_import import inspect_gguf, load_gguf, parsed_once

    with parsed_once():
        header = inspect_gguf(Path(path))
        tokenizer, model = load_gguf(Path(path), header)
    return model, tokenizer
