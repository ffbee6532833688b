"""GGUF export of a merged Qwen3 model for llama.cpp / Ollama, written with the ``gguf`` package.

What goes into the file (llama.cpp's ``qwen3`` architecture, as ``convert_hf_to_gguf.py``
writes it):

* model metadata: block count, context length, embedding / feed-forward length, head counts,
  key/value length (= ``head_dim``; Qwen3's is not ``hidden / heads`` in general), rope freq
  base, RMS-norm epsilon, file type;
* the tokenizer: ``gpt2``-style byte-level BPE (tokens, token types, merges), pre-tokenizer
  ``qwen2`` (Qwen3 uses Qwen2's split regex), bos/eos/pad ids, no automatic BOS;
* the chat template under ``tokenizer.chat_template`` plus ``reprotune.enable_thinking`` and
  ``reprotune.chat_template_sha256``, so the prompt format travels with the file;
* tensors renamed through ``gguf.get_tensor_name_map(MODEL_ARCH.QWEN3, n)`` (token_embd,
  blk.N.attn_q/k/v/output, attn_q_norm/attn_k_norm, ffn_gate/up/down, attn_norm, ffn_norm,
  output_norm, and ``output`` only when the embeddings are not tied).

Q/K layout: llama.cpp permutes Q/K rows only for the ``llama`` architecture (HF's rotate-half
rope vs ggml's interleaved "normal" rope); Qwen2/Qwen3 run ggml's NEOX rope, which *is*
rotate-half, so their weights are written as they are. transformers' GGUF loader agrees:
its ``TENSOR_PROCESSORS`` reverse-permutes only ``llama`` and uses the identity for qwen3.

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

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
ARCH = "qwen3"
KEY_ENABLE_THINKING = "reprotune.enable_thinking"
KEY_TEMPLATE_SHA = "reprotune.chat_template_sha256"
QTYPES = ("f16", "q8_0")


class GGUFUnsupported(RuntimeError):
    """The model cannot be written as GGUF here (architecture or shape not supported)."""


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFUnsupported("config has no rope_theta")
    if params.get("rope_type", "default") != "default":
        raise GGUFUnsupported(f"rope scaling {params.get('rope_type')!r} is not exported")
    return float(theta)


def _tokenizer_metadata(writer: Any, tokenizer: Any, config: Any, merges: Sequence[str]) -> None:
    """Vocabulary, token types, merges and special ids, the way llama.cpp's gpt2 vocab wants them."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    n_vocab = int(config.vocab_size)
    if len(by_id) > n_vocab:
        raise GGUFUnsupported(f"tokenizer has {len(by_id)} tokens, model only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):  # the embedding matrix may be padded beyond the tokenizer
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(merges))
    if getattr(config, "bos_token_id", None) is not None:
        writer.add_bos_token_id(int(config.bos_token_id))
    writer.add_eos_token_id(int(tokenizer.eos_token_id))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(int(tokenizer.pad_token_id))
    writer.add_add_bos_token(False)  # Qwen prompts start with <|im_start|>, never a BOS


def _keep(hf_name: str, keep_full_precision: Sequence[str]) -> bool:
    return any(frag in hf_name for frag in keep_full_precision)


def export_gguf(model_dir: str | Path, out_path: str | Path, *, qtype: str,
                keep_full_precision: Sequence[str], enable_thinking: bool,
                chat_template_sha256: str) -> dict[str, Any]:
    """Write ``model_dir`` (a plain HF Qwen3 model dir) as one GGUF file.

    Returns ``{"n_tensors", "tensor_types": {type: count}, "layer_errors": {module: rel}}``;
    layer errors (relative Frobenius error of W vs dequantised W) are given for Q8_0 tensors.
    """
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type != ARCH:
        raise GGUFUnsupported(f"GGUF export supports model_type {ARCH!r} only, got "
                              f"{config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not tokenizer.chat_template:
        raise GGUFUnsupported(f"{model_dir}: tokenizer has no chat template")
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    if not special.merges:
        raise GGUFUnsupported(f"{model_dir}/tokenizer.json: no BPE merges (not a BPE tokenizer?)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", use_safetensors=True,
                                                 local_files_only=True)
    arch = gguf.MODEL_ARCH.QWEN3
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"reprotune-{ARCH}")  # not the source path: identical input, identical bytes
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, tokenizer, config, special.merges)
    writer.add_chat_template(tokenizer.chat_template)
    writer.add_bool(KEY_ENABLE_THINKING, bool(enable_thinking))
    writer.add_string(KEY_TEMPLATE_SHA, chat_template_sha256)

    types: Counter[str] = Counter()
    errors: dict[str, float] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no `output` tensor
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise GGUFUnsupported(f"no llama.cpp qwen3 name for tensor {hf_name!r}")
        name = f"{gguf_base}.{suffix}"
        data = tensor.detach().float().numpy()
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
    """Metadata a consumer relies on, read back with ``gguf.GGUFReader``."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    return {
        "architecture": field("general.architecture"),
        "block_count": field(f"{ARCH}.block_count"),
        "key_length": field(f"{ARCH}.attention.key_length"),
        "chat_template": field("tokenizer.chat_template"),
        "enable_thinking": field(KEY_ENABLE_THINKING),
        "chat_template_sha256": field(KEY_TEMPLATE_SHA),
        "n_vocab": len(reader.get_field("tokenizer.ggml.tokens").data),
        "tensors": {t.name: {"shape": [int(x) for x in reversed(t.shape.tolist())],
                             "type": t.tensor_type.name} for t in reader.tensors},
    }


def load_gguf(path: str | Path) -> tuple[Any, Any]:
    """Load a GGUF file with transformers' own GGUF loader -> (model, tokenizer).

    transformers 5.23 maps no ``qwen3.attention.key_length`` to ``head_dim``, so a Qwen3
    whose head_dim is not the config class default (128) would be rebuilt with the wrong
    shapes; the value is read from the file itself and set on the config before loading.
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    key_length = gguf.GGUFReader(str(path)).get_field(f"{ARCH}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length.contents())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer
