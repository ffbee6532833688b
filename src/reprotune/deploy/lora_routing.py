"""Several LoRA adapters in one continuous-batching step: each request's tokens through its own.

transformers' continuous batching packs the query tokens of every scheduled request into one
row (``input_ids`` of shape ``[1, T]``). peft's mixed-adapter batches (``adapter_names=``)
pick the adapter per *batch row* (dimension 0), so inside that packed row every token would
get the same adapter: peft cannot mix adapters there. :class:`TokenRouter` does it per token
instead. The base ``Linear`` layers stay unmerged and shared; after each one, every token gets
the low-rank update of its own request's adapter::

    y[t] = W x[t] + B_a (s_a * A_a x[t])     a = the adapter of the request token t belongs to

A step with one adapter only computes peft's unmerged expression as peft does; a mixed step
stacks the adapters' ``A`` and ``B`` and masks the rank columns per token (two matrix products
per layer, whatever the mix). The token -> adapter
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
        # per step: the one adapter of every token, or (mixed) each token's adapter index
        self._single: int | None = None
        self._owner: Any = None
        self._masks: dict[tuple[tuple[int, int, float], ...], Any] = {}
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
        self._masks = {}
        if self._fixed is not None:
            self._single, self._owner = self._fixed, None
            return
        if self._manager is None or kwargs.get("cu_seq_lens_q") is None:
            raise RouteError("a forward pass outside continuous batching with no adapter "
                             "chosen: use TokenRouter.only(name)")
        bounds = [int(x) for x in kwargs["cu_seq_lens_q"].tolist()]
        rids = self._batch_ids()
        if len(bounds) != len(rids) + 1 or bounds[-1] != self._tokens:
            raise RouteError(f"batch layout not understood: {len(rids)} requests, "
                             f"cu_seq_lens_q {bounds[:8]}..., {self._tokens} tokens")
        owners = []
        for rid in rids:
            head = rid.split("-", 1)[0]
            if not head.startswith(PREFIX) or not head[len(PREFIX):].isdigit():
                raise RouteError(f"request {rid!r} names no adapter")
            owners.append(int(head[len(PREFIX):]))
        self.steps += 1
        if len(set(owners)) == 1:  # one adapter in this step: peft's own expression
            self._single, self._owner = owners[0], None
            return
        self.mixed_steps += 1
        self._single = None
        self._owner = torch.repeat_interleave(  # the adapter of each token of the row
            torch.tensor(owners, device=ids.device),
            torch.tensor([hi - lo for lo, hi in zip(bounds, bounds[1:], strict=False)],
                         device=ids.device))

    def _mask(self, stack: _Stack) -> Any:
        """[1, T, R]: a token's own adapter's scaling on that adapter's rank columns, else 0;
        built once per step for all the modules with the same adapters and ranks."""
        import torch

        mask = self._masks.get(stack.layout)
        if mask is None:
            mask = torch.where(stack.owner[None, :] == self._owner[:, None],
                               stack.scale[None, :], 0.0).unsqueeze(0)
            self._masks[stack.layout] = mask
        return mask

    def _adder(self, path: str, by_adapter: dict[int, LoraDelta]) -> Any:
        import torch.nn.functional as F

        stack = _Stack.of(by_adapter)

        def add(_module: Any, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0]
            if x.shape[1] != self._tokens:  # e.g. lm_head after logits_to_keep slicing
                raise RouteError(f"{path}: {x.shape[1]} positions, the step has "
                                 f"{self._tokens} tokens; its route does not apply")
            if self._single is not None:
                d = by_adapter.get(self._single)
                return out if d is None else out + F.linear(F.linear(x, d.a), d.b) * d.scaling
            # mixed step: every adapter's A on every token (r columns each), each token keeps
            # its own adapter's columns, scaled; one B product adds them. Two matrix products
            # per layer whatever the mix, instead of a gather and a scatter per adapter
            return out + F.linear(F.linear(x, stack.a) * self._mask(stack), stack.b)

        return add


@dataclass(frozen=True)
class _Stack:
    """One layer's adapters side by side: ``A`` rows and ``B`` columns concatenated."""

    a: Any  # [sum r, in]
    b: Any  # [out, sum r]
    owner: Any  # [sum r]: the adapter index of each rank column
    scale: Any  # [sum r]: its adapter's scaling
    layout: tuple[tuple[int, int, float], ...]  # (adapter, r, scaling) each

    @staticmethod
    def of(by_adapter: dict[int, LoraDelta]) -> _Stack:
        import torch

        ks = sorted(by_adapter)
        ds = [by_adapter[k] for k in ks]
        ranks = [d.a.shape[0] for d in ds]
        owner = torch.repeat_interleave(torch.tensor(ks), torch.tensor(ranks))
        scale = torch.repeat_interleave(torch.tensor([d.scaling for d in ds],
                                                     dtype=ds[0].a.dtype), torch.tensor(ranks))
        return _Stack(torch.cat([d.a for d in ds]).contiguous(),
                      torch.cat([d.b for d in ds], dim=1).contiguous(),
                      owner.to(ds[0].a.device), scale.to(ds[0].a.device),
                      tuple((k, r, d.scaling) for k, r, d in zip(ks, ranks, ds, strict=True)))
