"""Merged deployment model: adapters folded into the base weights, prompt format carried along.

``models/finetuned/`` holds what training wrote (see ``reprotune_train.json``):

* a LoRA / DoRA / QLoRA adapter -> ``merge_and_unload`` into a full-precision copy of the base
  (QLoRA too: merging into 4-bit weights would round the update away), then cast back to the
  base checkpoint's dtype and saved as safetensors: a plain transformers model dir that loads
  with ``AutoModelForCausalLM`` and no peft installed;
* a full / freeze fine-tune -> copied unchanged;
* a prompt- / prefix-tuning adapter -> cannot be merged (the soft prompt is extra key/value or
  input vectors, not a weight delta): the base model is written instead and the adapter is kept
  in ``soft_prompt/`` beside it; :func:`load_merged` puts the two back together.

Every output carries the tokenizer with its chat template and ``reprotune_merged.json``
``{method, kind, merged, reason, enable_thinking, chat_template_sha256, ...}``. The prompt
format check (:func:`render_probe`) renders one fixed multi-turn conversation; two artifacts
format prompts the same way exactly when their renderings are equal.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint

log = logging.getLogger(__name__)

TRAIN_INFO_FILE = "reprotune_train.json"
MERGED_INFO_FILE = "reprotune_merged.json"
SOFT_PROMPT_DIR = "soft_prompt"
ADAPTER_CONFIG = "adapter_config.json"
MERGEABLE_PEFT = {"LORA"}  # DoRA is LoRA with use_dora; QLoRA is LoRA on a 4-bit base
SOFT_PROMPT_PEFT = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}
REQUIRED_TRAIN_KEYS = ("method", "kind", "base_dir", "enable_thinking", "chat_template_sha256")
# system + user + assistant + user: exercises every role branch of the template, the
# historical-turn think handling and the generation prompt
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 plus 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "把“苹果”翻译成英文"},
]


# --------------------------------------------------------------------------- prompt format
def render_probe(tokenizer: Any, enable_thinking: bool) -> str:
    """The probe conversation rendered with ``tokenizer``'s chat template, ready to generate."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template")
    return tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False,
                                         add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_difference(expected: str, got: str) -> str | None:
    """None when equal, else where the two renderings first differ (for error messages)."""
    if expected == got:
        return None
    i = next((k for k, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
             min(len(expected), len(got)))
    return f"first difference at char {i}: expected {expected[i:i + 40]!r}, got {got[i:i + 40]!r}"


# --------------------------------------------------------------------------- manifest
def read_train_manifest(finetuned_dir: str | Path) -> dict[str, Any]:
    """``reprotune_train.json`` of a training output, checked for the keys merging needs."""
    path = Path(finetuned_dir) / TRAIN_INFO_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (is {finetuned_dir} a train stage output?)")
    info = io.read_json(path)
    missing = [k for k in REQUIRED_TRAIN_KEYS if k not in info]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    if info["kind"] not in ("adapter", "full"):
        raise ValueError(f"{path}: field kind: {info['kind']!r} is not adapter or full")
    return info


def _peft_type(finetuned_dir: Path) -> str:
    path = finetuned_dir / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing, but {TRAIN_INFO_FILE} says kind=adapter")
    peft_type = str(io.read_json(path).get("peft_type", "")).upper()
    if not peft_type:
        raise ValueError(f"{path}: field peft_type missing")
    return peft_type


def checkpoint_dtype(config: Any) -> Any:
    """The torch dtype a model config says its checkpoint is stored in (float32 if unset)."""
    import torch

    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _max_logit_diff(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- merge
def merge_finetuned(finetuned_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the deployment model for ``finetuned_dir`` to ``out_dir``; returns its manifest.

    For merged adapters the manifest includes ``max_abs_logit_diff``: adapter-applied vs merged
    logits on the probe conversation, both in float32 (merging is exact up to rounding).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from reprotune.modeling import load_model
    from reprotune.train.loading import load_finetuned, require_safetensors

    finetuned_dir, out_dir = Path(finetuned_dir), Path(out_dir)
    train = read_train_manifest(finetuned_dir)
    tokenizer = AutoTokenizer.from_pretrained(finetuned_dir, local_files_only=True)
    sha = template_fingerprint(tokenizer.chat_template or "")
    if sha != train["chat_template_sha256"]:
        raise ValueError(f"{finetuned_dir}: tokenizer chat template sha256 {sha[:12]} differs "
                         f"from {TRAIN_INFO_FILE} chat_template_sha256 "
                         f"{train['chat_template_sha256'][:12]}")
    info: dict[str, Any] = {"method": train["method"], "kind": train["kind"],
                            "enable_thinking": bool(train["enable_thinking"]),
                            "chat_template_sha256": sha, "base_dir": str(train["base_dir"]),
                            "soft_prompt_dir": None, "max_abs_logit_diff": None}

    if train["kind"] == "full":
        if (finetuned_dir / ADAPTER_CONFIG).exists():
            raise ValueError(f"{finetuned_dir}: kind=full but it holds {ADAPTER_CONFIG}")
        require_safetensors(finetuned_dir)  # copied unchanged: pickles would travel along
        info.update(merged=True, peft_type=None,
                    reason="full-weight fine-tune: copied unchanged (nothing to merge)")
        with io.atomic_dir(out_dir) as tmp:
            shutil.copytree(finetuned_dir, tmp, dirs_exist_ok=True)
            io.write_json(tmp / MERGED_INFO_FILE, info)
        log.info("%s: %s", train["method"], info["reason"])
        return info

    peft_type = _peft_type(finetuned_dir)
    base_dir = Path(train["base_dir"])
    if not base_dir.is_dir():
        raise FileNotFoundError(f"{finetuned_dir / TRAIN_INFO_FILE}: field base_dir: "
                                f"{base_dir} is not a directory")
    # the checkpoint's own dtype (bf16 for real Qwen3): merging runs in float32, saving in this
    save_dtype = checkpoint_dtype(AutoConfig.from_pretrained(base_dir, local_files_only=True))
    info["peft_type"] = peft_type

    if peft_type in SOFT_PROMPT_PEFT:
        info.update(merged=False, soft_prompt_dir=SOFT_PROMPT_DIR,
                    reason=f"{peft_type.lower()} learns virtual-token vectors, not a weight delta: "
                           f"it cannot be merged into the weights; the base model is written and "
                           f"the soft prompt adapter kept in {SOFT_PROMPT_DIR}/")
        log.warning("%s: %s", train["method"], info["reason"])
        base = load_model(base_dir, dtype=save_dtype)
        with io.atomic_dir(out_dir) as tmp:
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / SOFT_PROMPT_DIR).mkdir()
            for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
                shutil.copy2(finetuned_dir / name, tmp / SOFT_PROMPT_DIR / name)
            io.write_json(tmp / MERGED_INFO_FILE, info)
        return info

    if peft_type not in MERGEABLE_PEFT:
        raise ValueError(f"{finetuned_dir / ADAPTER_CONFIG}: peft_type {peft_type} is not "
                         f"supported (mergeable: {sorted(MERGEABLE_PEFT)}; soft prompts: "
                         f"{sorted(SOFT_PROMPT_PEFT)})")
    probe = tokenizer(render_probe(tokenizer, info["enable_thinking"]), return_tensors="pt",
                      add_special_tokens=False)
    # quantized=False: a QLoRA adapter is merged into the full-precision base, not the 4-bit one
    peft_model, _, _ = load_finetuned(finetuned_dir, dtype=torch.float32, quantized=False)
    with torch.inference_mode():
        applied = peft_model(**probe).logits
    merged = peft_model.merge_and_unload().eval()
    with torch.inference_mode():
        info["max_abs_logit_diff"] = _max_logit_diff(applied, merged(**probe).logits)
    info.update(merged=True, reason=f"{peft_type.lower()} adapter merged into the base weights "
                                    f"(merge_and_unload, float32, saved as {save_dtype})")
    log.info("%s: %s; max |logit diff| vs adapter %.3g", train["method"], info["reason"],
             info["max_abs_logit_diff"])
    with io.atomic_dir(out_dir) as tmp:
        merged.to(save_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        io.write_json(tmp / MERGED_INFO_FILE, info)
    return info


def load_merged(merged_dir: str | Path, *, dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, manifest) of a merge output, with its soft prompt re-attached if any."""
    from reprotune.modeling import load_model, load_tokenizer

    merged_dir = Path(merged_dir)
    info = io.read_json(merged_dir / MERGED_INFO_FILE)
    model = attach_soft_prompt(load_model(merged_dir, dtype=dtype), merged_dir)
    return model, load_tokenizer(merged_dir), info


def attach_soft_prompt(model: Any, merged_dir: str | Path) -> Any:
    """Wrap ``model`` with the merge output's soft prompt adapter, when it has one."""
    soft = Path(merged_dir) / SOFT_PROMPT_DIR
    if not soft.is_dir() or hasattr(model, "peft_config"):  # none, or already attached
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, soft, is_trainable=False).eval()


def directory_size(path: str | Path) -> int:
    """Bytes of every regular file under ``path`` (a file: its own size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file())

