"""Which CPU kernels computed a run's numbers, and on what machine.

CPU results depend on the kernels torch dispatches to: ATen's vectorised code for an
instruction-set level, MKL's BLAS branch (``MKL_CBWR``) and, for bf16, oneDNN's ISA.
``import reprotune`` pins the first two to one portable family (``reprotune.PORTABLE_ENV``, the
same on Intel and AMD) unless ``REPROTUNE_NATIVE_CPU=1``. :func:`kernel_family` names the family a run used and goes into the
model's lineage record: under the portable pin it holds nothing machine-specific, so the
model folder's hash stays the same on every x86-64 machine; with native kernels it names the
CPU, because then the numbers hold only there. :func:`machine` (vendor, model, threads) is
machine-specific and goes to the untracked timing files.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any

from reprotune import PORTABLE_ENV


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            out.setdefault(key.strip(), value.strip())
    return out


def is_portable() -> bool:
    """Every variable of the portable pin holds its pinned value in this process."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items()))


def use_native_kernels() -> None:
    """Lift the portable pin for this process (``train.mode: fast`` on CPU): MKL and ATen
    read these variables at their first use, so this must run before the first torch op."""
    for key, value in PORTABLE_ENV.items():
        if os.environ.get(key) == value:
            del os.environ[key]


def kernel_family() -> dict[str, Any]:
    """The settings CPU numbers depend on: ATen's ISA level in use, MKL's branch, oneDNN's
    ISA cap, and whether they are the portable pin (the CPU's name when they are not)."""
    import torch

    family: dict[str, Any] = {
        "aten_isa": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "portable": is_portable(),
    }
    if not family["portable"]:
        family["cpu"] = machine_name()
    return family


def machine_name() -> str:
    """``vendor model`` from /proc/cpuinfo (the platform's processor string elsewhere)."""
    info = _cpuinfo()
    name = " ".join(v for v in (info.get("vendor_id"), info.get("model name")) if v)
    return name or platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a run ran: the CPU, its torch thread count (when torch is loaded) and usable
    cores; machine-specific, so it goes to the untracked timing files."""
    torch = sys.modules.get("torch")
    return {"cpu": machine_name(),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


def describe(family: dict[str, Any]) -> str:
    """One line for ``make lineage``."""
    where = ("portable: same numbers on Intel and AMD" if family.get("portable")
             else f"native: numbers hold on {family.get('cpu', 'this CPU')} only")
    onednn = family.get("onednn_max_cpu_isa")
    return (f"ATen {family.get('aten_isa')}, MKL_CBWR={family.get('mkl_cbwr')}"
            f"{f', ONEDNN_MAX_CPU_ISA={onednn}' if onednn else ''} ({where})")
