"""``make serve``: an OpenAI-compatible HTTP server with continuous batching.

Batching is transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching``):
its background thread schedules every in-flight request into one step of paged attention,
adding new requests and retiring finished ones between steps. This module is the thin app
around it: FastAPI routes (``POST /v1/chat/completions`` plain and streaming, ``GET
/v1/models``, ``GET /health``), request validation (:mod:`reprotune.deploy.openai_api`) and
uvicorn. Decoding is greedy, so an answer equals offline greedy generation of the same prompt.

``python -m reprotune.deploy.server --model models/merged --port 8000`` binds 127.0.0.1
unless ``--host`` says otherwise; SIGTERM / Ctrl-C stop accepting, let in-flight requests
finish, then stop the batching thread.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from reprotune.deploy.openai_api import (
    ApiError,
    chunk_body,
    completion_body,
    parse_body,
    sse,
    validate_chat,
)
from reprotune.deploy.request_guard import SPECIAL_TEXT, prompt_ids
from reprotune.deploy.served_model import DTYPES, ServedModel, ServeError, load_served_model

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
MAX_TOKENS_LIMIT = 1024
GRACEFUL_S = 60  # SIGTERM waits at most this long for in-flight requests
MAX_SEQS = 32  # requests decoded together in one batch step
PAGE_SIZE = 64  # tokens per KV-cache page
CACHE_TOKENS = 16384  # KV cache size cap in tokens (about 3.7 GB for Qwen3-0.6B in float32)


class Engine:
    """Greedy generation through one running ``ContinuousBatchingManager``."""

    def __init__(self, served: ServedModel, *, max_batch_tokens: int = 512) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.served = served
        gen = GenerationConfig(do_sample=False, max_new_tokens=DEFAULT_MAX_TOKENS,
                               eos_token_id=served.stops,
                               pad_token_id=served.tokenizer.pad_token_id)
        # the KV cache sized for MAX_SEQS sequences of this model's context (capped): left to
        # itself it takes most of free RAM, and allocating ~11 GB took 24 s on CPU
        cache_tokens = min(MAX_SEQS * served.context, CACHE_TOKENS)
        cb = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=-(-cache_tokens // PAGE_SIZE),
                                      max_batch_tokens=max_batch_tokens,
                                      max_requests_per_batch=MAX_SEQS, max_queue_size=1024)
        self.manager = served.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb)
        self.manager.start()

    def alive(self) -> bool:
        return self.manager.is_running()

    async def generate(self, ids: list[int], max_new_tokens: int,
                       streaming: bool) -> AsyncIterator[tuple[list[int], bool]]:
        """Yield ``(tokens so far, finished)``: every token when ``streaming``, else once."""
        rid = f"req-{uuid.uuid4().hex}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.manager.register_result_handler(rid, outputs.put_nowait)
        if self.manager.add_request(ids, request_id=rid, max_new_tokens=max_new_tokens,
                                    streaming=streaming, eos_token_id=self.served.stops) is None:
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


def _finish(tokens: list[int], stops: Sequence[int]) -> tuple[list[int], str]:
    """(answer tokens without the stop token, OpenAI finish_reason)."""
    if tokens and tokens[-1] in stops:
        return tokens[:-1], "stop"
    return tokens, "length"


def build_app(served: ServedModel, *, max_tokens_limit: int = MAX_TOKENS_LIMIT,
              default_max_tokens: int = DEFAULT_MAX_TOKENS, special_text: str = "refuse") -> Any:
    """The FastAPI app serving ``served``; the batching thread runs while the app does.
    ``special_text``: what a control token's text in a request does (request_guard)."""
    from reprotune.markup import forbidden_strings

    state: dict[str, Engine] = {}
    forbidden = forbidden_strings(served.tokenizer)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        state["engine"] = Engine(served)
        log.info("continuous batching started for %s", served.model_id)
        yield
        state.pop("engine").stop()  # after uvicorn drained the in-flight requests
        log.info("continuous batching stopped")

    app = FastAPI(lifespan=lifespan, title="reprotune serve")

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}",
                                     code="server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = state.get("engine")
        ok = engine is not None and engine.alive()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "model": served.model_id},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.model_id, "object": "model",
                                            "created": 0, "owned_by": "reprotune"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = validate_chat(parse_body(await request.body()), model_id=served.model_id,
                            default_max_tokens=default_max_tokens,
                            max_tokens_limit=max_tokens_limit)
        ids = prompt_ids(served, req.messages, special_text=special_text, forbidden=forbidden)
        if len(ids) + req.max_tokens > served.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; with max_tokens="
                                f"{req.max_tokens} that is more than the model's context of "
                                f"{served.context}: shorten the messages or lower max_tokens",
                           param="messages")
        engine = state["engine"]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not req.stream:
            final: list[int] = []
            async for out, _ in engine.generate(ids, req.max_tokens, streaming=False):
                final = out  # non-streaming: one output, the finished one
            answer, finish = _finish(final, served.stops)
            return completion_body(rid, served.model_id, served.decode(answer), finish,
                                   len(ids), len(answer))
        gen = engine.generate(ids, req.max_tokens, streaming=True)
        first = await anext(gen)  # errors before the first byte still get a proper status

        async def events() -> AsyncIterator[str]:
            try:
                async for event in _events():
                    yield event
            finally:  # also when the client goes away mid-stream: cancel its generation
                await gen.aclose()

        async def _events() -> AsyncIterator[str]:
            sent, item = "", first
            yield sse(chunk_body(rid, served.model_id, delta={"role": "assistant",
                                                               "content": ""}))
            while True:
                tokens, done = item
                answer, finish = _finish(tokens, served.stops)
                text = served.decode(answer)
                # a multi-byte character split across tokens decodes to U+FFFD until complete
                if text.startswith(sent) and text != sent and (done or not text.endswith("\ufffd")):
                    yield sse(chunk_body(rid, served.model_id,
                                         delta={"content": text[len(sent):]}))
                    sent = text
                if done:
                    yield sse(chunk_body(rid, served.model_id, finish=finish))
                    if req.include_usage:
                        yield sse(chunk_body(rid, served.model_id, usage={
                            "prompt_tokens": len(ids), "completion_tokens": len(answer),
                            "total_tokens": len(ids) + len(answer)}))
                    yield sse("[DONE]")
                    return
                item = await anext(gen)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (0: any free port), or one-line ServeError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use: stop what holds it or "
                             f"pick another (make serve PORT={port + 1})") from exc
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def verify_folders(model_dir: str, info: dict[str, Any]) -> None:
    """The served folder (and an adapter's base) rehashed against dvc.lock, as evaluate,
    merge and quantize check theirs: a changed byte stops the start in one line."""
    from pathlib import Path

    from reprotune.verify import IntegrityError, verify_paths

    folders = [model_dir] + ([str(info["base_dir"])] if info.get("kind") == "adapter" else [])
    keys = []
    for folder in folders:
        try:  # dvc.lock names folders relative to the repository root (here: the cwd)
            keys.append(Path(folder).resolve().relative_to(Path.cwd().resolve()).as_posix())
        except ValueError:
            keys.append(Path(folder).as_posix())  # outside: not in dvc.lock, not verified
    try:
        checked = verify_paths(keys)
    except IntegrityError as exc:
        raise ServeError(f"{exc}; to serve it as it is: --no-verify") from None
    log.info("verified against dvc.lock: %s", ", ".join(checked) or "nothing (not DVC outputs)")


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000,
          model_id: str | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT,
          dtype: str = "float32", special_text: str = "refuse", verify: bool = True) -> None:
    """Load ``model_dir`` and serve it until SIGTERM / SIGINT (then drain and stop)."""
    import torch
    import uvicorn

    from reprotune.deploy.served_model import read_serving_manifest
    from reprotune.runtime import usable_cpus

    _, info = read_serving_manifest(model_dir)  # a wrong folder fails before the port is taken
    if verify:
        verify_folders(model_dir, info)
    sock = bind(host, port)
    torch.set_num_threads(usable_cpus())  # once, before the batching thread starts
    served = load_served_model(model_dir, model_id=model_id, dtype=dtype)
    app = build_app(served, max_tokens_limit=max_tokens_limit, special_text=special_text)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_S,
                            access_log=False)
    print(f"serving {served.model_id} ({model_dir}) on http://{host}:{bound}/v1 "
          f"(continuous batching, {dtype}, {torch.get_num_threads()} threads)", flush=True)
    # uvicorn drains, then re-raises the signal that stopped it; with these handlers in place
    # that re-raise is a no-op, so a drained shutdown exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    log.info("stopped: in-flight requests drained")


def _int_option(flag: str, value: str, low: int, high: int | None, what: str) -> int:
    """An integer option in [low, high], or exit with one line naming it (before loading)."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        sys.exit(f"serve: {flag} {value}: not {what}")
    return number


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m reprotune.deploy.server",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/merged", help="merge or train output folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", default="8000", help="0: any free port")
    ap.add_argument("--name", default=None, help="model id clients send (default: folder name)")
    ap.add_argument("--max-tokens-limit", default=str(MAX_TOKENS_LIMIT))
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="float32 (default: answers as evaluate scored them) or bfloat16")
    ap.add_argument("--special-text", choices=SPECIAL_TEXT, default="refuse",
                    help="a control token's text in a request (<|im_end|>, <think>): refuse "
                         "it with a 400 (default) or encode it as plain characters")
    ap.add_argument("--no-verify", action="store_true",
                    help="serve a folder whose bytes differ from dvc.lock")
    args = ap.parse_args(argv)
    port = _int_option("--port", args.port, 0, 65535, "a TCP port: 0-65535 (0: any free port)")
    limit = _int_option("--max-tokens-limit", args.max_tokens_limit, 1, None,
                        "the most tokens one answer may have: 1 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        serve(args.model, host=args.host, port=port, model_id=args.name,
              max_tokens_limit=limit, dtype=args.dtype, special_text=args.special_text,
              verify=not args.no_verify)
    except ServeError as exc:
        sys.exit(f"serve: {exc}")


if __name__ == "__main__":
    main()
