"""``train.launcher: accelerate``: the train stage re-runs itself under ``accelerate launch``.

dvc.yaml keeps one fixed command (``python stages/train.py ...``). With
``train.launcher: accelerate`` that process checks the launch (:func:`preflight`) and then
starts ``train.num_processes`` copies of the same script through accelerate's own launcher
(``accelerate.commands.launch``: the parser and ``launch_command`` behind the
``accelerate launch`` CLI), with ``train.accelerate_config`` as its config file. The copies
see :data:`LAUNCHED_ENV` and train; this process waits and turns a failed rank into one
line. So ``dvc repro`` and ``dvc exp run -S train.num_processes=4`` work unchanged.

:func:`preflight` fails before anything starts, naming the param, on: more processes than
devices, an FSDP config whose wrap class the model does not have, DeepSpeed asked for but
not installed, FSDP or DeepSpeed on a machine without CUDA (accelerate runs them on GPUs
only; on CPU it would silently fall back to plain data parallelism), a mixed precision in
the config that disagrees with ``train.precision``, and a DeepSpeed batch size or gradient
accumulation that disagrees with ``batch_size`` / ``train.grad_accum``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from reprotune import launcher
from reprotune.launcher import (  # noqa: F401 - re-exported: the train stage's names for them
    DDP_CONFIG,
    LAUNCHED_ENV,
    available_devices,
    free_port,
    inside_launch,
    launch_args,
)
from reprotune.params import TrainParams
from reprotune.train.methods import TrainSetupError

log = logging.getLogger(__name__)

PRECISION_TO_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def read_config(path: str | Path) -> Any:
    """The accelerate config file, read and checked by accelerate itself (unknown keys fail)."""
    from accelerate.commands.config.config_args import load_config_from_file

    where = f"train.accelerate_config: {path}"
    if not Path(path).is_file():
        shipped = sorted(p.as_posix() for p in Path("configs/accelerate").glob("*.yaml"))
        raise TrainSetupError(f"{where}: not found; shipped configs: {', '.join(shipped)}")
    try:
        return load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise TrainSetupError(f"{where}: not a valid accelerate config: "
                              f"{str(exc).splitlines()[0]}") from exc


def kind_of(config: Any) -> str:
    """``ddp``, ``fsdp`` or ``deepspeed`` for an accelerate config."""
    dtype = str(getattr(config.distributed_type, "value", config.distributed_type))
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(dtype, "ddp")


def deepspeed_json(config: Any) -> dict[str, Any] | None:
    """The DeepSpeed JSON that an accelerate config points at (``deepspeed_config_file``)."""
    path = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if not path:
        return None
    if not Path(path).is_file():
        raise TrainSetupError(f"train.accelerate_config: its deepspeed_config_file {path} is "
                              f"not found")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def layer_classes(base_dir: str | Path) -> set[str]:
    """Class names of every module of the base model, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {type(m).__name__ for m in model.modules()}


def _check_deepspeed(config: Any, path: str, batch_size: int, packing: bool,
                     train: TrainParams) -> None:
    """Numbers the DeepSpeed JSON fixes must be the params' (the Trainer fills "auto" ones
    from them and refuses a mismatch only after loading the model); deepspeed installed."""
    ds = deepspeed_json(config) or {}
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if packing and micro not in ("auto", 1):
        raise TrainSetupError(f"train.packing: packed runs take one pack per micro-step, but "
                              f"{path} fixes train_micro_batch_size_per_gpu at {micro}; set "
                              f"train.packing: false or use a config with \"auto\" there")
    for key, name, want in (("train_micro_batch_size_per_gpu", "batch_size", batch_size),
                            ("gradient_accumulation_steps", "train.grad_accum", train.grad_accum)):
        got = ds.get(key, "auto")
        if got != "auto" and not (packing and key == "train_micro_batch_size_per_gpu") \
                and int(got) != want:
            raise TrainSetupError(f"{name}: {want}, but {path} (its DeepSpeed JSON) fixes {key} "
                                  f"at {got}; set {name}: {got} or make it \"auto\" there")
    if importlib.util.find_spec("deepspeed") is None:
        raise TrainSetupError(f"train.accelerate_config: {path} uses DeepSpeed, which is not "
                              f"installed; pip install -e '.[deepspeed]' (CUDA machines), or use "
                              f"configs/accelerate/ddp.yaml or fsdp.yaml")


def preflight(train: TrainParams, *, batch_size: int, method: str, packing: bool,
              base_dir: str | Path) -> dict[str, Any]:
    """Check a multi-process launch before anything starts; returns what will run.

    Raises :class:`TrainSetupError` naming the param on the first problem.
    """
    from reprotune.train.training import resolve_precision

    path = train.accelerate_config
    config = read_config(path)
    kind = kind_of(config)
    have, what = available_devices()
    cuda = what.startswith("CUDA")
    if train.num_processes > have:
        raise TrainSetupError(f"train.num_processes: {train.num_processes} processes, but this "
                              f"machine has {have} {what}; use train.num_processes <= {have}")
    # what the config asks for is checked first, on any machine; then whether this one can
    if kind == "fsdp":
        wrap = str((config.fsdp_config or {}).get("fsdp_transformer_layer_cls_to_wrap") or "")
        present = layer_classes(base_dir)
        missing = [c.strip() for c in wrap.split(",") if c.strip() and c.strip() not in present]
        if missing:
            layers = sorted(c for c in present if c.endswith(("DecoderLayer", "Block", "Layer")))
            raise TrainSetupError(f"train.accelerate_config: {path} wraps {', '.join(missing)}, "
                                  f"which {base_dir} does not have; its layer classes: "
                                  f"{', '.join(layers) or 'none found'} (set "
                                  f"fsdp_transformer_layer_cls_to_wrap)")
    if kind == "deepspeed":
        _check_deepspeed(config, path, batch_size, packing, train)
    if kind in ("fsdp", "deepspeed") and method == "qlora":
        raise TrainSetupError(f"method: qlora cannot be sharded by {kind.upper()} here ({path}); "
                              f"use configs/accelerate/ddp.yaml")
    if kind in ("fsdp", "deepspeed") and not cuda:
        raise TrainSetupError(f"train.accelerate_config: {path} uses {kind.upper()}, which "
                              f"accelerate runs on CUDA GPUs only (on CPU it would quietly run "
                              f"plain data parallelism); use configs/accelerate/ddp.yaml here")
    precision = resolve_precision(train.precision, "cuda" if cuda else "cpu", train.mode)
    mixed = str(getattr(config, "mixed_precision", "no") or "no")
    if mixed != "no" and mixed != PRECISION_TO_MIXED[precision]:
        raise TrainSetupError(f"train.precision: {train.precision} runs {precision} here, but "
                              f"{path} asks for {mixed} mixed precision; set train.precision: "
                              f"{mixed} (or mixed_precision: 'no' in the config)")
    return {"kind": kind, "num_processes": train.num_processes, "precision": precision,
            "mixed_precision": PRECISION_TO_MIXED[precision], "config": path}


def relaunch(plan: dict[str, Any], script: str | Path, argv: list[str],
             role: str = "training") -> None:
    """:func:`reprotune.launcher.relaunch`, its one-line failure as a :class:`TrainSetupError`."""
    try:
        launcher.relaunch(plan, script, argv, role)
    except launcher.LaunchError as exc:
        raise TrainSetupError(str(exc)) from None
