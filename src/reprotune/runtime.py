"""Process set-up shared by every stage entry point: logging, offline mode, seeds."""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from collections.abc import Callable
from types import TracebackType

from reprotune.params import DEFAULT_PARAMS, DataParams, ParamsError, read_params

# Third-party messages that need no action in a stage, dropped at each stage's logging set-up
# (the one place): logger name -> message prefixes. Anything a user must act on stays.
QUIET_LOGS: dict[str, tuple[str, ...]] = {
    # format measures each row's full length before it cuts rows to format.max_length itself,
    # so the tokenizer's "longer than the model" notice is expected there
    "transformers.tokenization_utils_base": (
        "Token indices sequence length is longer than the specified maximum",),
    # bitsandbytes' optional CPU kernel comes from the hub (offline here) via `kernels`; its
    # built-in CPU path is used instead, with the same results
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels",),
    # torchao's optional CUDA extensions and Triton kernels do not exist on a CPU machine; the
    # INT8 path the quantize stage uses runs without them
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
}
# Python warnings of that kind: message prefixes (regular expressions matched at the start).
QUIET_WARNINGS: tuple[str, ...] = (
    # transformers' Trainer asks DDP to look for unused parameters (frozen ones, adapters);
    # torch then warns once per run when it finds none, which costs a graph walk, not results
    r"find_unused_parameters=True was specified in DDP constructor",
    # align.method orpo / simpo use trl.experimental's trainers (the only ones TRL has for
    # them); its import notice says the API may change, which the pinned lock settles
    r"You are importing from 'trl\.experimental'",
    # TRL's and peft's own calls of a transformers alias renamed in 5.x (nothing for a user to
    # change: the pipeline never calls it); printed once per align run
    r"`is_gradient_checkpointing` is deprecated",
)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the :data:`QUIET_LOGS` / :data:`QUIET_WARNINGS` filters (idempotent).

    A logger's filters apply to the records it emits itself, whatever handlers the library
    installs (transformers does not propagate to the root logger), and forked workers inherit
    them."""
    for name, prefixes in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def setup(stage: str, *, level: int = logging.INFO) -> logging.Logger:
    """Configure logging for a stage process, validate params.yaml and keep hub libraries
    offline-safe.

    Hub clients are told not to phone home: downloads only happen when the user asks for
    a hub model, and then :mod:`reprotune.modeling` fails fast if the hub is unreachable.
    """
    logging.basicConfig(level=level, format=f"%(asctime)s {stage} %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party()
    sys.excepthook = _params_error_hook(stage)
    if DEFAULT_PARAMS.exists():
        read_params()  # the WHOLE file, before this stage reads or writes anything
    return logging.getLogger(f"reprotune.stages.{stage}")


def _params_error_hook(
        stage: str) -> Callable[[type[BaseException], BaseException, TracebackType | None], None]:
    """A bad params.yaml value is the user's input, not a bug: one line, no traceback."""

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, ParamsError):
            print(f"{stage}: params.yaml: {exc}", file=sys.stderr)  # exit status stays 1
        else:
            sys.__excepthook__(kind, exc, tb)

    return hook


def usable_cpus() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one (Linux),
    else ``os.cpu_count()`` (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def data_processes(data: DataParams) -> int:
    """``data.num_proc`` as a number: ``auto`` is :func:`usable_cpus`. It lives here, not on
    the params class, because params.py validates values and knows nothing of the machine
    (and this module imports it)."""
    return usable_cpus() if data.num_proc == "auto" else int(data.num_proc)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (if imported) from one explicit seed."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass
