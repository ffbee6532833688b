"""What the server loads: a pipeline model folder checked and put in memory, ready to generate.

Two folders serve: the merge output (``models/merged``, ``reprotune_merged.json``) and the
train output (``models/finetuned``, ``reprotune_train.json``): a full fine-tune as it is, a
LoRA / DoRA / QLoRA adapter on its full-precision base, folded in memory with peft's
``merge_and_unload`` (what the merge stage writes to disk). Prompts are rendered with the
folder's own chat template and the ``enable_thinking`` its manifest says training used; the
template must still be the one training fingerprinted. Anything else (a quantised artifact, a
soft-prompt adapter, a folder that is no model) fails with one :class:`ServeError` line
naming the folder and what would work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint
from reprotune.deploy.merge import (
    ADAPTER_CONFIG,
    MERGED_INFO_FILE,
    SOFT_PROMPT_DIR,
    SOFT_PROMPT_PEFT,
    TRAIN_INFO_FILE,
)
from reprotune.deploy.quant_common import QUANT_INFO_FILE

log = logging.getLogger(__name__)

WHAT_SERVES = "serve models/merged (the merge stage's output) or models/finetuned"


class ServeError(RuntimeError):
    """The server cannot start; the message is one line naming the cause and the fix."""


@dataclass
class ServedModel:
    """A loaded model with the prompt format it was trained with."""

    model: Any
    tokenizer: Any
    model_id: str
    folder: Path
    enable_thinking: bool
    stops: list[int]
    context: int

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for ``messages``, rendered exactly as evaluation renders them."""
        from reprotune.evaluate.generation import render_prompts

        return render_prompts(self.tokenizer, [messages], None,
                              enable_thinking=self.enable_thinking)[0]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def read_serving_manifest(folder: str | Path) -> tuple[str, dict[str, Any]]:
    """``("merged" | "finetuned", manifest)`` of a servable folder, or :class:`ServeError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ServeError(f"{folder}: no such folder; {WHAT_SERVES}")
    if (folder / QUANT_INFO_FILE).is_file():
        method = io.read_json(folder / QUANT_INFO_FILE).get("method", "?")
        raise ServeError(f"{folder}: a quantised artifact ({method}), which the continuous-"
                         f"batching server does not load; {WHAT_SERVES}")
    kind = ("merged" if (folder / MERGED_INFO_FILE).is_file()
            else "finetuned" if (folder / TRAIN_INFO_FILE).is_file() else None)
    if kind is None:
        raise ServeError(f"{folder}: not a model folder the pipeline wrote (no "
                         f"{MERGED_INFO_FILE} or {TRAIN_INFO_FILE}); {WHAT_SERVES}")
    info = io.read_json(folder / (MERGED_INFO_FILE if kind == "merged" else TRAIN_INFO_FILE))
    missing = [k for k in ("enable_thinking", "chat_template_sha256") if k not in info]
    if missing:
        raise ServeError(f"{folder}: manifest lacks {', '.join(missing)}; rerun train and merge")
    soft = (folder / SOFT_PROMPT_DIR).is_dir() or (
        kind == "finetuned" and info.get("kind") == "adapter"
        and str(io.read_json(folder / ADAPTER_CONFIG).get("peft_type", "")).upper()
        in SOFT_PROMPT_PEFT)
    if soft:
        raise ServeError(f"{folder}: a soft-prompt ({info.get('method')}) model, which "
                         f"continuous batching cannot run (it adds virtual tokens, not "
                         f"weights); evaluate it offline or train a LoRA / full method to serve")
    return kind, info


DTYPES = ("float32", "bfloat16")


def load_served_model(folder: str | Path, *, model_id: str | None = None,
                      dtype: str = "float32") -> ServedModel:
    """Load ``folder`` for serving (``dtype``, default float32: evaluate's numbers; eval
    mode), checking its prompt format. bfloat16 halves the bytes each decoding step reads and
    uses the CPU's bf16 matrix units (AMX, AVX512-BF16) where it has them."""
    import torch

    from reprotune.modeling import load_model, load_tokenizer

    folder = Path(folder)
    kind, info = read_serving_manifest(folder)
    check_dtype(dtype)
    try:
        if kind == "merged":
            model, tok = load_model(folder, dtype=torch.float32), load_tokenizer(folder)
        else:
            from reprotune.train.loading import load_finetuned

            model, tok, _ = load_finetuned(folder, dtype=torch.float32, quantized=False)
            if info.get("kind") == "adapter":
                model = model.merge_and_unload()  # the merge stage's fold, in memory
        model = model.to(getattr(torch, dtype))  # after the fold: adapters merge in float32
    except (OSError, ValueError, RuntimeError) as exc:
        raise ServeError(f"{folder}: cannot load the model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); {WHAT_SERVES}") from exc
    return served_as(model.eval(), tok, folder, info, model_id or folder.name)


def check_dtype(dtype: str) -> None:
    """:class:`ServeError` unless this machine computes ``dtype`` (bf16 on CPU: AVX-512)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if dtype == "bfloat16" and not torch.cuda.is_available() and \
            capability not in ("AVX512", "AMX"):
        # torch's CPU bf16 attention packs with AVX-512 instructions only
        raise ServeError(f"--dtype bfloat16 on CPU needs AVX-512 kernels (torch runs "
                         f"{capability} here); start the server "
                         f"with REPROTUNE_NATIVE_CPU=1 on a CPU that has them, or use float32")


def served_as(model: Any, tok: Any, folder: Path, info: dict[str, Any],
              model_id: str) -> ServedModel:
    """``model`` served under ``model_id`` with ``folder``'s prompt format, whose chat
    template must still be the one training fingerprinted (``info``: its manifest)."""
    from reprotune.evaluate.generation import stop_token_ids

    sha = template_fingerprint(tok.chat_template or "")
    if sha != info["chat_template_sha256"]:
        raise ServeError(f"{folder}: chat template sha256 {sha[:12]} is not the one training "
                         f"used ({info['chat_template_sha256'][:12]}); restore the folder with "
                         f"`dvc checkout {folder}`")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    log.info("loaded %s (%s, enable_thinking=%s, context %d)", folder, info.get("method"),
             info["enable_thinking"], context)
    return ServedModel(model, tok, model_id, folder, bool(info["enable_thinking"]),
                       stop_token_ids(model, tok), context)
