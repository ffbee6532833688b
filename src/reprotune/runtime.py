"""Process set-up shared by every stage entry point: logging, offline mode, seeds."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from types import TracebackType

from reprotune.params import DEFAULT_PARAMS, DataParams, ParamsError, read_params


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
