"""Measuring one artifact the same way whatever its family, in a fresh process.

:func:`measure` loads the artifact through the registry (as a server would), renders the probe
conversation with the artifact's own tokenizer, times greedy generation on fixed prompts and
runs the evaluation (perplexity, main metric) on the test split. ``python -m
reprotune.deploy.quant_measure REQUEST RESULT`` runs it in a fresh process
(:func:`measure_in_subprocess`) so that nothing loaded while building (weights, caches,
imported peft) leaks into the numbers; that process sets torch's threads (and an ONNX
Runtime session's) to the usable cores once, so measurements never oversubscribe the CPU.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint
from reprotune.deploy.merge import SOFT_PROMPT_DIR, render_probe, text_sha256
from reprotune.deploy.quant_common import (
    FIRST_TOKENS,
    SPEED_NEW_TOKENS,
    SPEED_PROMPTS,
    SPEED_ROUNDS,
)


def set_threads() -> int:
    """torch intra-op threads = the usable cores, one inter-op thread; returns the count.

    torch defaults to every core of the machine, not the process's affinity mask, and a
    second pool per inter-op thread multiplied that: measuring int8 on a loaded 2-core
    machine took 13x as long as it should (threads waiting on each other).
    """
    import torch

    from reprotune.runtime import usable_cpus

    n = usable_cpus()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started: keep it
        pass
    return n


def _greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens (end-of-turn suppressed) after ``ids``."""
    import torch

    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, num_beams=1)
    return out[0, len(ids):].tolist()


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Load one artifact and measure it (meant for a fresh process, see :func:`main`).

    ``request``: ``{"method", "path", "test", "eval" (eval params dict), "eval_rows", "seed"}``.
    """
    import dataclasses

    import torch

    from reprotune.deploy.artifacts import load_artifact
    from reprotune.evaluate.evaluation import evaluate_model, load_test_rows
    from reprotune.params import EvalParams

    t0 = time.perf_counter()
    model, tok, thinking = load_artifact(request["method"], request["path"])
    load_s = time.perf_counter() - t0
    render = render_probe(tok, thinking)
    probe_ids = tok(render, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        first = _greedy(model, probe_ids, FIRST_TOKENS)
        speed_ids = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)
                     for p in SPEED_PROMPTS]
        speed_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in speed_ids]
        _greedy(model, speed_ids[0], 2)  # warm-up: first-call allocations are not throughput
        rounds = []
        for _ in range(SPEED_ROUNDS):  # best round: the least disturbed by other processes
            t1 = time.perf_counter()
            for ids in speed_ids:
                _greedy(model, ids, SPEED_NEW_TOKENS)
            rounds.append(time.perf_counter() - t1)
        gen_s = min(rounds)
    cfg = dataclasses.replace(EvalParams(**request["eval"]), max_rows=request["eval_rows"])
    metrics, records = evaluate_model(model, tok, load_test_rows(request["test"]), cfg,
                                enable_thinking=thinking, seed=request["seed"], progress=False)
    return {"method": request["method"], "load_s": round(load_s, 3),
            "tokens_per_s": round(len(SPEED_PROMPTS) * SPEED_NEW_TOKENS / gen_s, 3),
            "torch_threads": torch.get_num_threads(), "first_tokens": first,
            "enable_thinking": thinking, "chat_template": tok.chat_template,
            "template_sha256": template_fingerprint(tok.chat_template or ""),
            "render": render, "render_sha256": text_sha256(render), "probe_ids": probe_ids,
            "peft_blocked": "peft" in sys.modules and sys.modules["peft"] is None,
            "metrics": {k: v for k, v in metrics.items() if k not in ("confusion", "settings")},
            "rows": records}


def measure_in_subprocess(request: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure` in a fresh Python process (nothing cached from building)."""
    with tempfile.TemporaryDirectory(prefix="reprotune-measure-") as td:
        req, res = Path(td) / "request.json", Path(td) / "result.json"
        io.write_json(req, request)
        proc = subprocess.run([sys.executable, "-m", "reprotune.deploy.quant_measure", str(req),
                               str(res)], capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not res.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"measuring {request['method']} ({request['path']}) failed with "
                               f"exit code {proc.returncode}:\n{tail}")
        return io.read_json(res)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m reprotune.deploy.quant_measure REQUEST.json RESULT.json``: measure one
    artifact.

    When the artifact has no soft prompt, peft is made unimportable first: the measurement
    then also proves the artifact serves without peft.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m reprotune.deploy.quant_measure REQUEST.json "
                         "RESULT.json")
    request = io.read_json(args[0])
    set_threads()
    if not (Path(request["path"]) / SOFT_PROMPT_DIR).is_dir():
        sys.modules["peft"] = None  # type: ignore[assignment]
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # warns on every int8 matmul
    io.write_json(args[1], measure(request))


if __name__ == "__main__":
    main()
