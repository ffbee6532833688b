"""Several LoRA adapters served from one process over one copy of their base.

``make serve ADAPTERS="medical=models/finetuned legal=other/adapter"`` (``--adapters
name=folder ...``): each folder is a train-stage LoRA output (``reprotune_train.json`` of kind
``adapter``, ``adapter_config.json`` of a plain LoRA, ``adapter_model.safetensors``) and all
name the same base. The base is loaded once, every adapter is read by peft (its scaling,
rsLoRA and rank patterns as peft computes them), its ``A``/``B`` matrices are kept and peft's
wrappers are removed again (``unload``: the base layers come back unmerged), and a
:class:`~reprotune.deploy.lora_routing.TokenRouter` adds each request's own adapter update in
the batched forward. Each adapter is served under its name with its own folder's prompt
format (chat template fingerprint, ``enable_thinking``, stop tokens).

Refused in one line before anything loads: a folder that is not a plain LoRA adapter (a
merged or full model, DoRA, a soft prompt, ``modules_to_save``, an updated ``lm_head``, no
safetensors weights), two adapters on different bases, a malformed or repeated name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.deploy.lora_routing import LoraDelta, TokenRouter
from reprotune.deploy.merge import ADAPTER_CONFIG, TRAIN_INFO_FILE
from reprotune.deploy.served_model import (
    ServedModel,
    ServeError,
    check_dtype,
    read_serving_manifest,
    served_as,
)

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json keys whose non-empty value is more than a low-rank update of Linear
# layers (full modules, extra tokens, MoE parameters): one base cannot carry several of them
NOT_PLAIN = ("use_dora", "modules_to_save", "trainable_token_indices", "target_parameters",
             "lora_bias", "alora_invocation_tokens", "layer_replication", "use_qalora",
             "use_bdlora")


@dataclass(frozen=True)
class AdapterSpec:
    """One ``name=folder`` of ``--adapters``."""

    name: str
    folder: Path


def parse_specs(items: Sequence[str]) -> list[AdapterSpec]:
    """``["medical=models/finetuned", ...]`` -> specs; :class:`ServeError` on a bad item."""
    specs: list[AdapterSpec] = []
    for item in items:
        name, eq, folder = item.partition("=")
        if not eq or not folder or not NAME.fullmatch(name):
            raise ServeError(f"--adapters {item!r}: write name=folder, the name letters, digits, "
                             f"'.', '_' or '-' (it is the model field clients send)")
        if any(s.name == name for s in specs):
            raise ServeError(f"--adapters: the name {name!r} is given twice")
        specs.append(AdapterSpec(name, Path(folder)))
    if not specs:
        raise ServeError("--adapters: name at least one name=folder")
    return specs


def _base_of(info: dict[str, Any]) -> Path:
    return Path(str(info["base_dir"])).resolve()  # relative paths: to the cwd, as train wrote


def check_specs(specs: Sequence[AdapterSpec]) -> dict[str, dict[str, Any]]:
    """Each spec's train manifest, after checking that it is a plain LoRA adapter with
    safetensors weights and that all name one base; :class:`ServeError` otherwise."""
    infos: dict[str, dict[str, Any]] = {}
    for s in specs:
        if not (s.folder / TRAIN_INFO_FILE).is_file():
            what = "no such folder" if not s.folder.is_dir() else f"no {TRAIN_INFO_FILE}"
            raise ServeError(f"adapter {s.name} ({s.folder}): {what}, not a LoRA adapter the "
                             f"train stage wrote; --adapters serves LoRA / QLoRA train outputs "
                             f"(serve a merged model alone with --model)")
        kind, info = read_serving_manifest(s.folder)
        config = (io.read_json(s.folder / ADAPTER_CONFIG)
                  if (s.folder / ADAPTER_CONFIG).is_file() else {})
        peft_type = str(config.get("peft_type", "")).upper()
        extra = [k for k in NOT_PLAIN if config.get(k)]
        if kind != "finetuned" or info.get("kind") != "adapter" or peft_type != "LORA" or extra:
            what = (f"a {kind} model" if kind != "finetuned" or info.get("kind") != "adapter"
                    else f"a {peft_type or 'non-peft'} adapter" if peft_type != "LORA"
                    else f"a LoRA adapter with {', '.join(extra)}")
            raise ServeError(f"adapter {s.name} ({s.folder}): {what}, not a plain LoRA adapter; "
                             f"--adapters serves LoRA / QLoRA train outputs (serve anything "
                             f"else alone with --model)")
        if not (s.folder / ADAPTER_WEIGHTS).is_file():
            raise ServeError(f"adapter {s.name} ({s.folder}): no {ADAPTER_WEIGHTS} (pickled "
                             f"adapters are not loaded); rerun the train stage")
        infos[s.name] = info
    first = specs[0]
    expected = _base_of(infos[first.name])
    for s in specs[1:]:
        if _base_of(infos[s.name]) != expected:
            raise ServeError(f"adapter {s.name} ({s.folder}) is on base "
                             f"{infos[s.name]['base_dir']}, not {expected} (the base of "
                             f"{first.name}); adapters served together share one base")
    if not expected.is_dir():
        raise ServeError(f"adapter {first.name} ({first.folder}): its base {expected} is not "
                         f"there; run the base stage or move the adapters with their base")
    return infos


def _deltas(peft_model: Any, names: list[str]) -> dict[str, dict[int, LoraDelta]]:
    """``{module path: {adapter index: A, B, scaling}}`` of every LoRA layer peft built."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    out: dict[str, dict[int, LoraDelta]] = {}
    for path, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not Linear or module.lora_embedding_A or \
                getattr(module, "fan_in_fan_out", False) or path.endswith("lm_head"):
            raise ServeError(f"{path}: a {type(module).__name__} LoRA layer; --adapters routes "
                             f"LoRA on the transformer's nn.Linear layers only")
        for k, name in enumerate(names):
            if name not in module.lora_A:
                continue
            if name in getattr(module, "lora_variant", {}):
                raise ServeError(f"adapter {name}: {path} is a LoRA variant "
                                 f"({type(module.lora_variant[name]).__name__}); not routable")
            out.setdefault(path, {})[k] = LoraDelta(
                module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach(),
                float(module.scaling[name]))
    return out


def load_adapters(specs: Sequence[AdapterSpec], *, dtype: str = "float32"
                  ) -> tuple[dict[str, ServedModel], TokenRouter]:
    """``({name: ServedModel}, router)``: one base model in memory, shared by every entry, with
    the router's hooks on it. Compute in ``dtype``; adapters stay unmerged (no per-adapter
    copy of any base weight)."""
    import torch
    from peft import PeftModel

    from reprotune.modeling import load_model, load_tokenizer

    infos = check_specs(specs)
    check_dtype(dtype)
    names = [s.name for s in specs]
    base_dir = _base_of(infos[names[0]])
    try:
        base = load_model(base_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(specs[0].folder), adapter_name=names[0],
                                               is_trainable=False)
        for s in specs[1:]:
            peft_model.load_adapter(str(s.folder), adapter_name=s.name, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ServeError(f"adapters on {base_dir}: cannot load ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]})") from exc
    deltas = _deltas(peft_model, names)
    model = peft_model.unload().eval()  # peft's wrappers out, base layers back, unmerged
    model.to(getattr(torch, dtype))
    deltas = {path: {k: LoraDelta(d.a.to(getattr(torch, dtype)), d.b.to(getattr(torch, dtype)),
                                  d.scaling) for k, d in by.items()}
              for path, by in deltas.items()}
    router = TokenRouter(model, names, deltas)
    served = {s.name: served_as(model, load_tokenizer(s.folder), s.folder, infos[s.name], s.name)
              for s in specs}
    log.info("%d adapters on one base %s: %s (%d LoRA layers)", len(specs), base_dir,
             ", ".join(names), len(deltas))
    return served, router
