"""``make serve``: an OpenAI-compatible HTTP server with continuous batching.

Batching is transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching``):
its background thread schedules every in-flight request into one step of paged attention,
adding new requests and retiring finished ones between steps. This module is the thin app
around it: FastAPI routes (``POST /v1/chat/completions`` plain and streaming, ``GET
/v1/models``, ``GET /health``), request validation (:mod:`reprotune.deploy.openai_api`) and
uvicorn. Decoding is greedy, so an answer equals offline greedy generation of the same prompt.

``python -m reprotune.deploy.server --model models/merged --port 8000`` binds 127.0.0.1
unless ``--host`` says otherwise; SIGTERM / Ctrl-C stop accepting, let in-flight requests
finish, then stop the batching thread. ``--adapters medical=models/finetuned legal=...``
serves several LoRA adapters over one base instead (:mod:`reprotune.deploy.adapters`): the
request's ``model`` field picks the adapter, and requests for different adapters share each
batch step (:mod:`reprotune.deploy.lora_routing`).
"""

from __future__ import annotations

import argparse
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

from reprotune.deploy.engine import DEFAULT_MAX_TOKENS, GRACEFUL_S, Engine
from reprotune.deploy.lora_routing import TokenRouter
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

MAX_TOKENS_LIMIT = 1024


def _finish(tokens: list[int], stops: Sequence[int]) -> tuple[list[int], str]:
    """(answer tokens without the stop token, OpenAI finish_reason)."""
    if tokens and tokens[-1] in stops:
        return tokens[:-1], "stop"
    return tokens, "length"


def build_app(served: ServedModel | dict[str, ServedModel], *,
              router: TokenRouter | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT,
              default_max_tokens: int = DEFAULT_MAX_TOKENS, special_text: str = "refuse") -> Any:
    """The FastAPI app serving ``served`` (or ``{name: adapter}`` over one base, with the
    ``router`` of :func:`reprotune.deploy.adapters.load_adapters`); the batching thread runs
    while the app does. ``special_text``: what a control token's text in a request does."""
    from reprotune.markup import forbidden_strings

    models = served if isinstance(served, dict) else {served.model_id: served}
    state: dict[str, Engine] = {}
    forbidden = {name: forbidden_strings(m.tokenizer) for name, m in models.items()}

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        state["engine"] = Engine(next(iter(models.values())), router=router)
        log.info("continuous batching started for %s", ", ".join(models))
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
        return JSONResponse({"status": "ok" if ok else "unhealthy",
                             "model": ", ".join(models)}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "reprotune"} for name in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = validate_chat(parse_body(await request.body()), model_ids=list(models),
                            default_max_tokens=default_max_tokens,
                            max_tokens_limit=max_tokens_limit)
        served = models[req.model]
        ids = prompt_ids(served, req.messages, special_text=special_text,
                         forbidden=forbidden[req.model])
        if len(ids) + req.max_tokens > served.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; with max_tokens="
                                f"{req.max_tokens} that is more than the model's context of "
                                f"{served.context}: shorten the messages or lower max_tokens",
                           param="messages")
        engine = state["engine"]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        route = {"adapter": req.model if router is not None else None, "stops": served.stops}
        if not req.stream:
            final: list[int] = []
            async for out, _ in engine.generate(ids, req.max_tokens, streaming=False, **route):
                final = out  # non-streaming: one output, the finished one
            answer, finish = _finish(final, served.stops)
            return completion_body(rid, served.model_id, served.decode(answer), finish,
                                   len(ids), len(answer))
        gen = engine.generate(ids, req.max_tokens, streaming=True, **route)
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


def verify_folders(model_dir: str, info: dict[str, Any], *, also: Sequence[str] = ()) -> None:
    """The served folder (and an adapter's base, and the folders in ``also``) rehashed
    against dvc.lock, as evaluate, merge and quantize check theirs: a changed byte stops the
    start in one line."""
    from pathlib import Path

    from reprotune.verify import IntegrityError, verify_paths

    folders = [model_dir] + ([str(info["base_dir"])] if info.get("kind") == "adapter" else [])
    keys: list[str] = []
    for folder in [*folders, *also]:
        try:  # dvc.lock names folders relative to the repository root (here: the cwd)
            key = Path(folder).resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            key = Path(folder).as_posix()  # outside: not in dvc.lock, not verified
        keys += [] if key in keys else [key]  # one base under several adapters: hashed once
    try:
        checked = verify_paths(keys)
    except IntegrityError as exc:
        raise ServeError(f"{exc}; to serve it as it is: --no-verify") from None
    log.info("verified against dvc.lock: %s", ", ".join(checked) or "nothing (not DVC outputs)")


def serve(model_dir: str, *, adapters: Sequence[str] = (), host: str = "127.0.0.1",
          port: int = 8000, model_id: str | None = None,
          max_tokens_limit: int = MAX_TOKENS_LIMIT, dtype: str = "float32",
          special_text: str = "refuse", verify: bool = True) -> None:
    """Load ``model_dir`` (or the ``name=folder`` LoRA ``adapters`` over their one base) and
    serve it until SIGTERM / SIGINT (then drain and stop)."""
    import torch
    import uvicorn

    from reprotune.deploy.adapters import check_specs, load_adapters, parse_specs
    from reprotune.deploy.served_model import read_serving_manifest
    from reprotune.runtime import usable_cpus

    # a wrong folder fails before the port is taken
    specs = parse_specs(adapters) if adapters else []
    if specs:
        info = check_specs(specs)[specs[0].name]
        model_dir = str(specs[0].folder)
    else:
        _, info = read_serving_manifest(model_dir)
    if verify:
        verify_folders(model_dir, info, also=[str(s.folder) for s in specs[1:]])
    sock = bind(host, port)
    torch.set_num_threads(usable_cpus())  # once, before the batching thread starts
    router = None
    if specs:
        served, router = load_adapters(specs, dtype=dtype)
        what = ", ".join(f"{s.name}={s.folder}" for s in specs) + " over one base"
    else:
        one = load_served_model(model_dir, model_id=model_id, dtype=dtype)
        served, what = {one.model_id: one}, f"{one.model_id} ({model_dir})"
    app = build_app(served, router=router, max_tokens_limit=max_tokens_limit,
                    special_text=special_text)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_S,
                            access_log=False)
    print(f"serving {what} on http://{host}:{bound}/v1 "
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
    ap.add_argument("--model", default=None,
                    help="merge or train output folder (default: models/merged)")
    ap.add_argument("--adapters", nargs="+", default=[], metavar="NAME=FOLDER",
                    help="serve these LoRA adapters (train outputs on one base) instead; the "
                         "request's model field picks one by NAME")
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
    if args.adapters and (args.model or args.name):
        sys.exit("serve: --adapters names its models itself: leave out --model and --name")
    port = _int_option("--port", args.port, 0, 65535, "a TCP port: 0-65535 (0: any free port)")
    limit = _int_option("--max-tokens-limit", args.max_tokens_limit, 1, None,
                        "the most tokens one answer may have: 1 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        serve(args.model or "models/merged", adapters=args.adapters, host=args.host,
              port=port, model_id=args.name,
              max_tokens_limit=limit, dtype=args.dtype, special_text=args.special_text,
              verify=not args.no_verify)
    except ServeError as exc:
        sys.exit(f"serve: {exc}")


if __name__ == "__main__":
    main()
