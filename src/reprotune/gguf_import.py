"""A GGUF file in: dequantised by transformers' GGUF loader into a plain safetensors folder.

transformers loads a GGUF checkpoint with ``from_pretrained(folder, gguf_file=...)``,
dequantising every tensor to float32 (numpy, element-wise: the same bytes on every CPU), but
the model it returns refuses ``save_pretrained`` ("quantized with gguf ... not
serializable"). So the weights are moved into a model built from the same config without its
``quantization_config`` (every key must match) and that one is saved: from then on the model
is an ordinary transformers folder with its tokenizer and chat template, for every stage.

Before anything heavy, the file's header is read with the ``gguf`` package so that an
architecture transformers cannot load, or a tensor type gguf cannot dequantise, ends with one
line naming it. :func:`parsed_once` around both makes the whole load parse the file once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reprotune.model_sources import ModelSourceError

log = logging.getLogger(__name__)

# GGUF's tokenizer.ggml.pre names llama.cpp's pre-tokenizer; transformers' GGUF converter
# ignores it for gpt2-style vocabularies and always splits with GPT-2's regex. Those that
# split differently are restored here, as the original tokenizer.json has them (llama.cpp
# llama-vocab.cpp: "smollm" splits every digit alone before GPT-2's regex).
GPT2_PRE = ("default", "gpt-2", "gpt2")
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "smollm": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": True}],
}


@contextmanager
def parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and gguf's tensor-name map built once.

    A load parses the file four times (the header check here, then transformers' tokenizer,
    config and weights loaders, each with its own ``gguf.GGUFReader``: ~4 s apiece for
    SmolLM2's 49k-token vocabulary) and builds the same ``TensorNameMap`` once per submodule
    (397 times for SmolLM2, ~6 s): half of a 30 s load. Both are read-only once built, so the
    block hands every caller the same object; the weights and tokenizer come out byte-identical.
    transformers imports both names from ``gguf`` at call time, which is what is swapped here
    and put back on exit (one thread loads at a time in every stage).
    """
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Architecture, tensor types and counts from a GGUF header; refuses what cannot be loaded."""
    import gguf
    from gguf.quants import _type_traits  # the dequantisers gguf implements
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file, said in one line
        raise ModelSourceError(f"model.name: {path} is not a readable GGUF file ({exc})") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelSourceError(f"model.name: {path} has no general.architecture")
    arch = _string(field)
    pre = reader.fields.get("tokenizer.ggml.pre")
    vocab = reader.fields.get("tokenizer.ggml.model")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(
            f"model.name: {path.name} is a {arch!r} GGUF; transformers loads only "
            f"{', '.join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer')))}: "
            f"convert the original checkpoint instead")
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
             gguf.GGMLQuantizationType.BF16}
    types: dict[str, int] = {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype not in plain and qtype not in _type_traits:
            raise ModelSourceError(
                f"model.name: {path.name}: tensor {t.name} is {qtype.name}, which the gguf package "
                f"cannot dequantise; use a file quantised as Q8_0, Q4_0/1, Q5_0/1, Q*_K, F16 or F32")
        types[qtype.name] = types.get(qtype.name, 0) + 1
    return {"architecture": arch, "tensor_types": dict(sorted(types.items())),
            "n_tensors": len(reader.tensors),
            "tokenizer_model": _string(vocab) if vocab else None,
            "tokenizer_pre": _string(pre) if pre else None}


def _string(field: Any) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _unmapped_head_dim(path: Path, arch: str) -> int | None:
    """``{arch}.attention.key_length`` when transformers would not take ``head_dim`` from the
    file (it maps ``rope.dimension_count`` to it for llama, nothing for qwen3)."""
    # transformers' own header reader: it skips the vocabulary (gguf's GGUFReader parses all
    # 49k tokens and merges into objects, seconds per file)
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta = read_gguf_metadata(str(path))[0]
    key_length = meta.get(f"{arch}.attention.key_length")
    if key_length is None or meta.get(f"{arch}.rope.dimension_count") == key_length:
        return None
    return int(key_length)


def fix_pre_tokenizer(tokenizer: Any, header: dict[str, Any]) -> None:
    """Give a gpt2-style GGUF vocabulary the pre-tokenizer its ``tokenizer.ggml.pre`` names."""
    import json

    from tokenizers import Tokenizer

    pre = header.get("tokenizer_pre")
    if header.get("tokenizer_model") != "gpt2" or pre is None or pre in GPT2_PRE:
        return
    if pre not in PRE_TOKENIZERS:
        # numbers and some punctuation may then split differently from the original tokenizer
        log.warning("GGUF pre-tokenizer %r is not reproduced; GPT-2's split is used", pre)
        return
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]}
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))


def load_gguf(path: Path, header: dict[str, Any], *, dtype: Any = None) -> tuple[Any, Any]:
    """(tokenizer, model) from a GGUF file: a plain model whose weights are the dequantised ones.

    ``header`` is :func:`inspect_gguf`'s; ``dtype`` defaults to float32 (what the GGUF
    dequantisation produces). transformers 5.23 maps no ``qwen3.attention.key_length`` to
    ``head_dim``, so a Qwen3 whose head_dim is not its config class default (128) would be
    rebuilt with the wrong shapes: the file's own value is set on the config first (parsing
    the header once more, so only where needed).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    dtype = dtype or torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
        config = None
        head_dim = _unmapped_head_dim(path, header["architecture"])
        if head_dim is not None:
            config = AutoConfig.from_pretrained(folder, gguf_file=file, local_files_only=True)
            config.head_dim = head_dim
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, config=config,
                                                      dtype=dtype, local_files_only=True)
    except (ValueError, NotImplementedError, KeyError, OSError) as exc:
        raise ModelSourceError(f"model.name: transformers cannot load {path.name}: "
                               f"{str(exc).splitlines()[0]}") from exc
    fix_pre_tokenizer(tokenizer, header)
    config = loaded.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF general.name, not a path
    plain_config = type(config).from_dict(config_dict)
    # fork_rng: the throwaway random init must not move the caller's RNG stream
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(plain_config, dtype=dtype)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys
               if not (k == "lm_head.weight" and plain_config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ModelSourceError(
            f"model.name: {path.name}: the dequantised weights do not match a plain "
            f"{type(model).__name__} (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    return tokenizer, model
