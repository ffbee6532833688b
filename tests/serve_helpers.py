"""Helpers of the in-process server tests (test_serve_guard.py, test_fuzz.py): the tiny
model as the merge stage writes it, and an app served on 127.0.0.1 for the test's duration."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reprotune import io


def write_merged(base_dir: Path, root: Path) -> Path:
    """models/merged for a full fine-tune of the tiny model, as train + merge write it."""
    from reprotune.chat_template import template_fingerprint
    from reprotune.deploy.merge import merge_finetuned
    from reprotune.modeling import load_tokenizer

    finetuned = root / "models" / "finetuned"
    shutil.copytree(base_dir, finetuned)
    io.write_json(finetuned / "reprotune_train.json", {
        "method": "full", "kind": "full", "base_dir": str(base_dir), "enable_thinking": False,
        "chat_template_sha256": template_fingerprint(load_tokenizer(base_dir).chat_template)})
    merge_finetuned(finetuned, root / "models" / "merged")
    return root / "models" / "merged"


@contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on 127.0.0.1:<ephemeral>; stopped on exit."""
    import uvicorn

    from reprotune.deploy.server import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "in-process server did not start within 60 s"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive()
