"""Greedy generation through one running transformers ``ContinuousBatchingManager``.

Its background thread schedules every in-flight request into one step of paged attention,
adding new requests and retiring finished ones between steps; :class:`Engine` starts it with
this server's sizes, feeds it requests and hands each request's tokens back to the asyncio
code of the app (:mod:`reprotune.deploy.server`). With a
:class:`~reprotune.deploy.lora_routing.TokenRouter`, requests for different LoRA adapters
share the steps, each through its own adapter.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from reprotune.deploy.lora_routing import TokenRouter
from reprotune.deploy.openai_api import ApiError
from reprotune.deploy.served_model import ServedModel

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
GRACEFUL_S = 60  # SIGTERM waits at most this long for in-flight requests
MAX_SEQS = 32  # requests decoded together in one batch step
PAGE_SIZE = 64  # tokens per KV-cache page
CACHE_TOKENS = 16384  # KV cache size cap in tokens (about 3.7 GB for Qwen3-0.6B in float32)


class Engine:
    """Greedy generation through one running ``ContinuousBatchingManager``; with a
    ``router``, each request names the adapter its tokens go through."""

    def __init__(self, served: ServedModel, *, router: TokenRouter | None = None,
                 max_batch_tokens: int = 512) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.served, self.router = served, router
        # the router reads the batch the manager has just prepared and runs Python hooks in
        # every step: one I/O buffer (no async double-buffering) and no CUDA graphs (a replay
        # skips the hooks). No KV blocks shared between requests with a common prompt prefix
        # either: under different adapters the same prefix has different keys and values.
        routed: dict[str, Any] = {} if router is None else {
            "allow_block_sharing": False, "use_async_batching": False, "use_cuda_graph": False}
        gen = GenerationConfig(do_sample=False, max_new_tokens=DEFAULT_MAX_TOKENS,
                               eos_token_id=served.stops,
                               pad_token_id=served.tokenizer.pad_token_id)
        # the KV cache sized for MAX_SEQS sequences of this model's context (capped): left to
        # itself it takes most of free RAM, and allocating ~11 GB took 24 s on CPU
        cache_tokens = min(MAX_SEQS * served.context, CACHE_TOKENS)
        cb = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=-(-cache_tokens // PAGE_SIZE),
                                      max_batch_tokens=max_batch_tokens,
                                      max_requests_per_batch=MAX_SEQS, max_queue_size=1024,
                                      **routed)
        self.manager = served.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb)
        if router is not None:
            router.attach(self.manager)
        self.manager.start()

    def alive(self) -> bool:
        return self.manager.is_running()

    async def generate(self, ids: list[int], max_new_tokens: int, streaming: bool, *,
                       adapter: str | None = None, stops: Sequence[int] | None = None
                       ) -> AsyncIterator[tuple[list[int], bool]]:
        """Yield ``(tokens so far, finished)``: every token when ``streaming``, else once."""
        rid = (f"req-{uuid.uuid4().hex}" if self.router is None or adapter is None
               else self.router.request_id(adapter))
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.manager.register_result_handler(rid, outputs.put_nowait)
        if self.manager.add_request(ids, request_id=rid, max_new_tokens=max_new_tokens,
                                    streaming=streaming,
                                    eos_token_id=list(stops or self.served.stops)) is None:
            raise ApiError(503, "the server is shutting down; retry elsewhere",
                           code="server_unavailable")
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if out.error:
                    raise RuntimeError(f"generation failed: {out.error}")
                finished = out.is_finished()
                yield list(out.generated_tokens), finished
        finally:
            if not finished:  # the client went away: free its slot in the batch
                self.manager.cancel_request(rid)

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=GRACEFUL_S)
