"""What every quantised-artifact family shares: the registry entry type, the manifest and side
files, layer-error helpers, the measurement settings, and the two failure kinds.

Each family module (:mod:`~reprotune.deploy.quant_int8`, :mod:`~reprotune.deploy.quant_bnb`,
:mod:`~reprotune.deploy.quant_gguf`, :mod:`~reprotune.deploy.quant_onnx`) exports one
:class:`Family`: how to build its artifact folder and how to load it back as a server would.
:mod:`reprotune.deploy.artifacts` registers them; :mod:`reprotune.deploy.quant_measure`
measures any of them the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.deploy.merge import SOFT_PROMPT_DIR

QUANT_INFO_FILE = "reprotune_quant.json"
TARGET_LOSS_PCT = 2.0  # int8 methods should lose less than this (relative %) on ppl / main metric
WORST_K = 5
FIRST_TOKENS = 8
SPEED_NEW_TOKENS = 32
SPEED_ROUNDS = 3
SPEED_PROMPTS = ("Give three tips for staying healthy.", "计算 12 加 7 等于多少？",
                 "Translate 'good morning' into Chinese.")


class MethodUnavailable(RuntimeError):
    """This quantisation method cannot run on this machine; the message says why."""


class TemplateMismatch(RuntimeError):
    """An artifact formats prompts differently from training; ``results`` holds what was measured."""

    def __init__(self, message: str, results: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class BuildContext:
    """What a family's build step gets: the merged folder, its manifest and float32 model."""

    merged_dir: Path
    merged: dict[str, Any]  # reprotune_merged.json
    float_model: Any
    keep: Sequence[str]
    dtype: Any  # the merged checkpoint's dtype (bf16 for real Qwen3)


@dataclass(frozen=True)
class Family:
    """One artifact family: ``build(method, ctx, out) -> {"quantized_modules", "layer_errors",
    ...}`` writes the weights into ``out``; ``load(method, path) -> (model, tokenizer)``
    loads them as a server would. ``own_tokenizer``: the weights file carries tokenizer and
    template (GGUF), so only the manifest and soft prompt are written beside it."""

    methods: tuple[str, ...]
    build: Callable[[str, BuildContext, Path], dict[str, Any]]
    load: Callable[[str, Path], tuple[Any, Any]]
    own_tokenizer: bool = False


def kept(name: str, keep_full_precision: Sequence[str]) -> bool:
    """True when module ``name`` stays unquantised."""
    return any(frag in name for frag in keep_full_precision)


def relative_error(w: Any, w_hat: Any) -> float:
    """Relative Frobenius error ``||W - W_hat|| / ||W||`` (float64)."""
    w, w_hat = w.double(), w_hat.double()
    return float((w - w_hat).norm() / max(float(w.norm()), 1e-30))


def worst_layers(errors: dict[str, float], k: int = WORST_K) -> list[dict[str, Any]]:
    return [{"layer": n, "rel_error": round(e, 6)}
            for n, e in sorted(errors.items(), key=lambda x: (-x[1], x[0]))[:k]]


def linears(model: Any, keep: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules to quantise, sorted."""
    import torch

    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not kept(n, keep))


def save_side_files(merged_dir: Path, out: Path, info: dict[str, Any], *,
                    tokenizer: bool = True) -> None:
    """Config, generation config, tokenizer + chat template, soft prompt, manifest."""
    from reprotune.modeling import load_tokenizer

    if tokenizer:
        for name in ("config.json", "generation_config.json"):
            if (merged_dir / name).exists() and not (out / name).exists():
                shutil.copy2(merged_dir / name, out / name)
        load_tokenizer(merged_dir).save_pretrained(out)  # whatever files this tokenizer needs
    if (merged_dir / SOFT_PROMPT_DIR).is_dir():
        shutil.copytree(merged_dir / SOFT_PROMPT_DIR, out / SOFT_PROMPT_DIR)
    io.write_json(out / QUANT_INFO_FILE, info)
