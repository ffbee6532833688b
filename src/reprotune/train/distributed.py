"""Training across processes: who this process is, and what only rank 0 may do.

The train stage runs as one process (``train.launcher: python``) or as one of
``train.num_processes`` processes started by ``accelerate launch``
(:mod:`reprotune.train.launch`). Every process runs the same
:func:`reprotune.train.training.train_model`; this module holds the few places where they
must differ or agree:

* identity from the launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), so a
  single process reads as rank 0 of 1 and nothing here changes a one-process run;
* :func:`init` starts the process group before the Trainer does: on CPU with gloo and
  ``train.collective_timeout_s`` (the Trainer passes its ``ddp_timeout`` only to GPU back-ends),
  so a rank that stops answering fails the collective instead of hanging the run;
* :func:`broadcast`, :func:`sum_over_ranks`, :func:`max_over_ranks`, :func:`barrier`:
  rank 0 decides (resume point), every rank counts (label tokens), all agree;
* :func:`shares_node`: whether the ranks share one machine, so rank 0 can write the
  memory-mapped data once for all of them (:func:`reprotune.train.data.load_splits`);
* :func:`saveable_model`: under FSDP or DeepSpeed ZeRO-3 each rank holds a shard of every
  weight; the full state dict is gathered (a collective) and rank 0 writes it as one
  safetensors file, so the folder loads exactly like a one-process one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)


def world_size() -> int:
    """Number of training processes (1 when not launched by accelerate/torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank of this process (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank of this process on its machine: the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes the outputs (rank 0)."""
    return rank() == 0


def shares_node() -> bool:
    """Whether several ranks run and all of them on this machine (torchrun's
    ``LOCAL_WORLD_SIZE`` equals the world size), so they can share files in its temp folder."""
    world = world_size()
    return world > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == world


def local_device() -> str:
    """``cpu``, ``cuda`` (one process) or ``cuda:<local rank>`` (one GPU per process)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank()}" if world_size() > 1 else "cuda"


def _dist() -> Any:
    import torch.distributed as dist

    return dist if world_size() > 1 and dist.is_available() and dist.is_initialized() else None


def init(device: str, timeout_s: int) -> None:
    """Start the process group of a multi-process run (a no-op for one process).

    On CPU: gloo with ``timeout_s``. On CUDA the Trainer starts NCCL itself with the same
    timeout (``ddp_timeout``); only the process's GPU is selected here.
    """
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    if rank() > 0:  # one log per run: the other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)
    log.info("process group: gloo, %d processes, collective timeout %d s", world_size(),
             timeout_s)


def init_collectives(device: str, timeout_s: int) -> None:
    """A process group for a run without a Trainer (data-parallel evaluation): NCCL on CUDA,
    gloo on CPU, with ``timeout_s`` (a no-op for one process)."""
    init(device, timeout_s)
    if world_size() == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=timeout_s))


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce(value: float, op: str) -> float:
    dist = _dist()
    if dist is None:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.item()


def sum_over_ranks(value: int) -> int:
    """``value`` summed over the ranks (an integer count)."""
    return int(round(_all_reduce(float(value), "SUM")))


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of any rank."""
    return _all_reduce(float(value), "MAX")


def finish() -> None:
    """Leave the process group once every rank is done (a no-op for one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- strategy
@dataclass(frozen=True)
class Strategy:
    """How the Trainer's accelerator shards the model: ``single``, ``ddp``, ``fsdp`` or
    ``deepspeed`` (with its ZeRO stage)."""

    kind: str
    zero_stage: int | None = None

    @property
    def sharded_weights(self) -> bool:
        """Each rank holds only a shard of every weight (FSDP, ZeRO-3)."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)


def strategy_of(trainer: Any) -> Strategy:
    """The strategy the Trainer's accelerator actually runs."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        return Strategy("fsdp")
    if kind == DistributedType.DEEPSPEED:
        return Strategy("deepspeed", int(acc.deepspeed_config["zero_optimization"]["stage"]))
    return Strategy("ddp" if acc.num_processes > 1 else "single")


class _GatheredModel:
    """A model whose ``save_pretrained`` writes a state dict gathered from every rank."""

    def __init__(self, model: Any, state_dict: dict[str, Any]) -> None:
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, out_dir: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(out_dir, state_dict=self.state_dict, **kwargs)


def saveable_model(trainer: Any) -> Any:
    """What rank 0 saves: the model itself, or (FSDP, ZeRO-3) the model with its full state
    dict gathered from the shards. Every rank must call it: gathering is a collective."""
    strategy = strategy_of(trainer)
    if not strategy.sharded_weights:
        return trainer.model  # the Trainer keeps it unwrapped (DDP's wrapper is model_wrapped)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    log.info("%s: gathered the full state dict (%d tensors) for one safetensors file",
             strategy.kind, len(state or {}))
    return _GatheredModel(trainer.accelerator.unwrap_model(trainer.model), state)


def summary(trainer: Any, batch_size: int, grad_accum: int, packing: bool) -> dict[str, Any]:
    """How the run was spread, for ``metrics/train.json``: processes, strategy and the
    global batch (``batch_size x train.grad_accum x processes`` sequences; packed:
    ``train.grad_accum x processes`` packs)."""
    strategy = strategy_of(trainer)
    n = trainer.accelerator.num_processes
    per_process = 1 if packing else batch_size
    out: dict[str, Any] = {"num_processes": n, "strategy": strategy.kind,
                           "backend": str(trainer.accelerator.state.backend or "none"),
                           "global_batch": per_process * grad_accum * n,
                           "global_batch_unit": "packs" if packing else "sequences"}
    if strategy.zero_stage is not None:
        out["zero_stage"] = strategy.zero_stage
    return out


def first_eval_callback(on_loss: Callable[[float], Any]) -> Any:
    """A TrainerCallback that passes the first evaluation's loss to ``on_loss`` (the val loss
    before training, with ``eval_on_start``); ``on_loss`` may raise to stop the run."""
    from transformers import TrainerCallback

    class FirstEval(TrainerCallback):
        done = False

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not self.done and metrics and "eval_loss" in metrics:
                self.done = True
                on_loss(float(metrics["eval_loss"]))

    return FirstEval()
