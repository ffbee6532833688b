"""Fast paths that failed and fell back to a slower one: said loudly once, kept for the metrics.

A fast path that raises (the varlen attention kernel, liger-kernel's layers or fused loss,
``torch.compile``, the fp32-accumulating GEMM) must never leave a run silently slow. Each
call site catches what it can survive, runs the slower path and calls :func:`record` with the
path's name and the exception: the first failure of each path logs one ``logging.warning``
with the exception's one-line reason; later ones are counted. :func:`report` gives
``fast_path_fallbacks`` for ``metrics/train.json`` (``{"varlen": "RuntimeError: ..."}``;
empty when every fast path that was tried ran); ``bench/gpu_summary.py`` counts them.

The record is per process (the failures are properties of this machine and its kernels);
:func:`reset` starts a new run's record (``train_model`` calls it before the model is built).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MAX_REASON = 300  # characters of the exception kept in the metrics


class _Seen:
    reasons: dict[str, str] = {}
    counts: dict[str, int] = {}


def reason(exc: BaseException | str) -> str:
    """``Type: first line of the message`` (at most :data:`MAX_REASON` characters)."""
    if isinstance(exc, str):
        return exc[:MAX_REASON]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:MAX_REASON]


def record(path: str, exc: BaseException | str, instead: str) -> str:
    """A failure of fast path ``path``; ``instead``: what runs now. Returns the reason.

    The first failure of ``path`` in this run is logged as a warning; every one is counted.
    """
    why = reason(exc)
    _Seen.counts[path] = _Seen.counts.get(path, 0) + 1
    if path not in _Seen.reasons:
        _Seen.reasons[path] = why
        log.warning("fast path %s failed (%s); %s instead: this run is slower than it should "
                    "be (fast_path_fallbacks in the train metrics)", path, why, instead)
    return why


def report() -> dict[str, str]:
    """``fast_path_fallbacks`` for the metrics: path -> first reason (with a count if > 1)."""
    return {p: why if _Seen.counts[p] == 1 else f"{why} ({_Seen.counts[p]} times)"
            for p, why in sorted(_Seen.reasons.items())}


def reset() -> None:
    """Forget earlier failures (a new run in the same process)."""
    _Seen.reasons, _Seen.counts = {}, {}
