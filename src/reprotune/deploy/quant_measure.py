"""Measuring one artifact the same way whatever its family, in a fresh process.

:func:`measure` loads the artifact through the registry (as a server would), renders the probe
conversation with the artifact's own tokenizer, times greedy generation on fixed prompts and
runs the evaluation (perplexity, main metric) on the test split. :class:`FreshMeasurer` runs
each measurement in a fresh process, so that nothing loaded while building (weights, caches,
imported peft) or while measuring another artifact leaks into the numbers: a child forked
from one ``python -m reprotune.deploy.quant_measure --serve`` process that has imported the
libraries (torch, transformers, the metrics) and nothing else. Forking saves each artifact
the ~5 s of imports a new interpreter pays (three quarters of measuring the embedded model).
The child sets torch's threads (and an ONNX Runtime session's) to the usable cores once, so
measurements never oversubscribe the CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

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


class FreshMeasurer:
    """Measures artifacts one by one, each in a fresh process (see the module docstring).

    ``with FreshMeasurer() as m: m.measure(request)``; the serving process starts on entry
    and ends on exit.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0

    @property
    def _log(self) -> Path:
        """The serving process's own output (imports, a crash before any child)."""
        assert self._dir is not None
        return Path(self._dir.name) / "serve.log"

    def __enter__(self) -> FreshMeasurer:
        self._dir = tempfile.TemporaryDirectory(prefix="reprotune-measure-")
        with self._log.open("w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "reprotune.deploy.quant_measure", "--serve"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # end of requests: the serving process exits
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def measure(self, request: dict[str, Any]) -> dict[str, Any]:
        """:func:`measure` ``request`` in a fresh child; RuntimeError with its last lines if
        it fails."""
        if self._proc is None or self._dir is None:
            raise RuntimeError("FreshMeasurer.measure outside its `with` block")
        self._count += 1
        base = Path(self._dir.name) / f"{self._count}"
        req, res, err = (base.with_suffix(s) for s in (".request.json", ".result.json", ".log"))
        io.write_json(req, request)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(f"{req}\t{res}\t{err}\n")
            self._proc.stdin.flush()
            reply = self._proc.stdout.readline().strip()
        except (BrokenPipeError, OSError):
            reply = ""
        if reply != "0" or not res.exists():
            why = err if err.exists() and err.stat().st_size else self._log
            tail = "\n".join(why.read_text(errors="replace").strip().splitlines()[-15:])
            code = reply or f"none (the serving process ended: {self._proc.poll()})"
            raise RuntimeError(f"measuring {request['method']} ({request['path']}) failed with "
                               f"exit code {code}:\n{tail}")
        return io.read_json(res)


def measure_in_subprocess(request: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure` once in a fresh process (nothing cached from building)."""
    with FreshMeasurer() as measurer:
        return measurer.measure(request)


def _measure_here(request_path: str, result_path: str) -> None:
    """Measure the request in this (fresh) process and write the result.

    When the artifact has no soft prompt, peft is made unimportable first: the measurement
    then also proves the artifact serves without peft.
    """
    request = io.read_json(request_path)
    set_threads()
    if not (Path(request["path"]) / SOFT_PROMPT_DIR).is_dir():
        sys.modules["peft"] = None  # type: ignore[assignment]
    io.write_json(result_path, measure(request))


def _preimport() -> None:
    """The libraries every measurement imports, once, before any child is forked. Nothing
    runs a tensor op here: torch's thread pools start in each child (forking a process whose
    OpenMP pool is running is unsafe), and peft stays unimported (children block it)."""
    import rouge_score.rouge_scorer  # noqa: F401
    import sacrebleu  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import reprotune.deploy.artifacts  # noqa: F401
    import reprotune.evaluate.evaluation  # noqa: F401

    if "peft" in sys.modules:  # pragma: no cover - a library started importing peft
        raise RuntimeError("peft was imported before measuring: it could not be blocked")


def _serve(requests: IO[str]) -> None:
    """For each line ``REQUEST<TAB>RESULT<TAB>LOG`` fork a child that measures it (its output
    to LOG); reply its exit code on a line of the original stdout, which nothing else writes
    to (this process's own output goes to stderr)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preimport()
    for line in requests:
        req, res, err = line.rstrip("\n").split("\t")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: measure, then leave without running the parent's cleanup
            code = 1
            try:
                replies.close()
                fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                _measure_here(req, res)
                code = 0
            except BaseException:  # noqa: B036 - reported in its log, as an exit code
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
        replies.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m reprotune.deploy.quant_measure REQUEST.json RESULT.json``: measure one
    artifact here; ``--serve``: the forking server :class:`FreshMeasurer` talks to."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # warns on every int8 matmul
    if args == ["--serve"]:
        _serve(sys.stdin)
        return
    if len(args) != 2:
        raise SystemExit("usage: python -m reprotune.deploy.quant_measure REQUEST.json "
                         "RESULT.json | --serve")
    _measure_here(args[0], args[1])


if __name__ == "__main__":
    main()
