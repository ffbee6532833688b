"""The tokenizer of a GGUF export: llama.cpp's ``gpt2``-style byte-level BPE vocabulary.

What ``convert_hf_to_gguf.py`` writes for a BPE tokenizer (``_set_vocab_gpt2``): every token
with its type (added special tokens CONTROL, other added tokens USER_DEFINED, ids the
tokenizer lacks ``[PAD<i>]`` UNUSED), the merges, ``tokenizer.ggml.pre`` naming the
pre-tokenizer llama.cpp must split with, and the bos/eos/unk/pad ids; ``add_bos_token`` is
false (ChatML prompts start with ``<|im_start|>``, never a BOS).

``tokenizer.ggml.pre``: llama.cpp recognises a pre-tokenizer by hashing how it tokenizes a
test text; here the tokenizer's own ``pre_tokenizer`` spec is matched instead. Qwen3 files say
``qwen2`` (Qwen3 uses Qwen2's split regex). A Llama-architecture BPE tokenizer must be one that
:mod:`reprotune.gguf_import` rebuilds identically on the way back: GPT-2's byte-level split
(``gpt-2``) or one of its :data:`~reprotune.gguf_import.PRE_TOKENIZERS` (SmolLM2's ``smollm``:
digits one by one, then GPT-2's split); any other is refused, since the file would tokenize
differently from the model's training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from reprotune.gguf_import import PRE_TOKENIZERS

# GPT-2's split, as tokenizers spells a plain byte-level pre-tokenizer
GPT2_SPEC = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}


class GGUFUnsupported(RuntimeError):
    """The model cannot be written as GGUF here (architecture, tokenizer or shape)."""


def pre_tokenizer_name(tokenizer: Any, arch: str) -> str:
    """The ``tokenizer.ggml.pre`` value for ``tokenizer`` in a file of architecture ``arch``."""
    if arch == "qwen3":
        return "qwen2"
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    if spec == GPT2_SPEC:
        return "gpt-2"
    for name, parts in PRE_TOKENIZERS.items():
        if spec == {"type": "Sequence", "pretokenizers": parts}:
            return name
    kinds = ([p.get("type") for p in spec.get("pretokenizers", [])]
             if spec and spec.get("type") == "Sequence" else [spec and spec.get("type")])
    raise GGUFUnsupported(
        f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) is neither GPT-2's "
        f"byte-level split nor one of {', '.join(sorted(PRE_TOKENIZERS))}: the GGUF would "
        f"tokenize differently from training, so it is not exported")


def write_tokenizer(writer: Any, tokenizer: Any, config: Any, merges: Sequence[str],
                    pre: str) -> None:
    """Vocabulary, token types, merges and special ids, the way llama.cpp's gpt2 vocab wants
    them; ``pre`` is :func:`pre_tokenizer_name`'s answer."""
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
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(merges))
    if getattr(config, "bos_token_id", None) is not None:
        writer.add_bos_token_id(int(config.bos_token_id))
    writer.add_eos_token_id(int(tokenizer.eos_token_id))
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(int(tokenizer.unk_token_id))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(int(tokenizer.pad_token_id))
    writer.add_add_bos_token(False)  # ChatML prompts start with <|im_start|>, never a BOS
