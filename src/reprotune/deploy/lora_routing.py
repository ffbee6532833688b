"""Several LoRA adapters in one continuous-batching step: each request's tokens through its own.

transformers' continuous batching packs the query tokens of every scheduled request into one
row (``input_ids`` of shape ``[1, T]``). peft's mixed-adapter batches (``adapter_names=``)
pick the adapter per *batch row* (dimension 0), so inside that packed row every token would
get the same adapter: peft cannot mix adapters there. :class:`TokenRouter` does it per token
instead. The base ``Linear`` layers stay unmerged and shared; after each one, every adapter's
low-rank update is added to the positions of its own requests' tokens::

    y[t] = W x[t] + s_a * B_a (A_a x[t])     a = the adapter of the request token t belongs to

The same expression, in the same order, as peft's unmerged LoRA forward. The token -> adapter
route is built once per step, in a forward pre-hook on the model, from the batch the manager
has just prepared (its requests in packing order and ``cu_seq_lens_q``); the adapter is
written in each request id (``lora<k>-...``), so the router holds no per-request state.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "lora"


@dataclass(frozen=True)
class LoraDelta:
    """One adapter's update of one ``Linear``: ``scaling * B @ A``, kept factored."""

    a: Any  # [r, in]
    b: Any  # [out, r]
    scaling: float


class RouteError(RuntimeError):
    """A step whose tokens cannot be given an adapter (nothing is computed with a guess)."""


class TokenRouter:
    """Hooks on a model that add each request's own LoRA update to its tokens.

    ``deltas``: ``{module path: {adapter index: LoraDelta}}`` for ``names[index]``; an adapter
    that does not target a module adds nothing there (as in peft)."""

    def __init__(self, model: Any, names: list[str], deltas: dict[str, dict[int, LoraDelta]]
                 ) -> None:
        self.names = list(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._manager: Any = None
        self._fixed: int | None = None
        # per step: [(adapter index, token positions or None for all tokens)]
        self._plan: list[tuple[int, Any]] = []
        self._tokens = 0
        self.steps = self.mixed_steps = 0  # forward passes routed; with several adapters
        modules = dict(model.named_modules())
        self._hooks = [model.register_forward_pre_hook(self._route, with_kwargs=True)]
        for path, by_adapter in deltas.items():
            self._hooks.append(modules[path].register_forward_hook(self._adder(path, by_adapter)))

    def request_id(self, name: str) -> str:
        """A fresh request id that carries adapter ``name``."""
        return f"{PREFIX}{self._index[name]}-{uuid.uuid4().hex}"

    def attach(self, manager: Any) -> None:
        """Route the steps of this ``ContinuousBatchingManager`` (by its requests' ids)."""
        self._manager = manager

    @contextmanager
    def only(self, name: str) -> Iterator[None]:
        """Every token through adapter ``name``: offline generation outside the manager."""
        self._fixed = self._index[name]
        try:
            yield
        finally:
            self._fixed = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _batch_ids(self) -> list[str]:
        """Request ids of the batch the manager is about to run, in packing order. Reads
        transformers' batch processor (sync I/O, no CUDA graphs: set by the engine)."""
        try:
            states = self._manager.batch_processor.inputs_and_outputs.requests_in_batch
            return [s.state.request_id for s in states]
        except AttributeError as exc:  # a transformers release that moved it: fail, loudly
            raise RouteError(f"cannot read the continuous batch's requests from this "
                             f"transformers version ({exc}); multi-adapter serving needs "
                             f"transformers' batch_processor.inputs_and_outputs") from exc

    def _route(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        self._tokens = int(ids.shape[1])
        if self._fixed is not None:
            self._plan = [(self._fixed, None)]
            return
        if self._manager is None or kwargs.get("cu_seq_lens_q") is None:
            raise RouteError("a forward pass outside continuous batching with no adapter "
                             "chosen: use TokenRouter.only(name)")
        bounds = [int(x) for x in kwargs["cu_seq_lens_q"].tolist()]
        rids = self._batch_ids()
        if len(bounds) != len(rids) + 1 or bounds[-1] != self._tokens:
            raise RouteError(f"batch layout not understood: {len(rids)} requests, "
                             f"cu_seq_lens_q {bounds[:8]}..., {self._tokens} tokens")
        spans: dict[int, list[int]] = {}
        for rid, lo, hi in zip(rids, bounds, bounds[1:], strict=False):
            head = rid.split("-", 1)[0]
            if not head.startswith(PREFIX) or not head[len(PREFIX):].isdigit():
                raise RouteError(f"request {rid!r} names no adapter")
            spans.setdefault(int(head[len(PREFIX):]), []).extend(range(lo, hi))
        self.steps += 1
        if len(spans) == 1:  # one adapter in this step: no gather/scatter
            self._plan = [(next(iter(spans)), None)]
        else:
            self.mixed_steps += 1
            self._plan = [(k, torch.tensor(pos, dtype=torch.long, device=ids.device))
                          for k, pos in spans.items()]

    def _adder(self, path: str, by_adapter: dict[int, LoraDelta]) -> Any:
        import torch.nn.functional as F

        def add(_module: Any, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0]
            if x.shape[1] != self._tokens:  # e.g. lm_head after logits_to_keep slicing
                raise RouteError(f"{path}: {x.shape[1]} positions, the step has "
                                 f"{self._tokens} tokens; its route does not apply")
            for k, pos in self._plan:
                d = by_adapter.get(k)
                if d is None:
                    continue
                if pos is None:
                    out = out + F.linear(F.linear(x, d.a), d.b) * d.scaling
                else:  # this adapter's tokens only; the rest of the row keeps its own update
                    sub = F.linear(F.linear(x[:, pos], d.a), d.b) * d.scaling
                    out = out.index_add(1, pos, sub.to(out.dtype))
            return out

        return add
