"""What this CPU computes natively, for the choices that depend on it.

``train.mode: fast`` picks bf16 autocast only where the CPU has bf16 arithmetic
(:func:`cpu_bf16`: AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32.
:func:`cpu_kernels` names the kernel settings CPU results depend on (the ATen capability
``MKL_CBWR`` and oneDNN's ISA cap, pinned by ``import reprotune`` unless
``REPROTUNE_NATIVE_CPU=1``; :mod:`reprotune.cpu_kernels`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``, or the text given; empty elsewhere)."""
    if cpuinfo is None:
        return _machine_flags()
    return next((frozenset(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
                 if line.startswith("flags")), frozenset())


@functools.lru_cache(maxsize=1)
def _machine_flags() -> frozenset[str]:
    path = Path("/proc/cpuinfo")
    return cpu_flags(path.read_text(errors="replace") if path.is_file() else "")


def cpu_bf16(cpuinfo: str | None = None) -> str | None:
    """The flag that says this CPU computes in bf16 natively (AMX first), or None."""
    flags = cpu_flags(cpuinfo)
    return next((f for f in BF16_FLAGS if f in flags), None)


def cpu_kernels() -> str:
    """The kernel settings CPU numbers depend on: the ATen capability and MKL_CBWR."""
    import torch

    return (f"ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}, "
            f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
