"""reprotune: a DVC-orchestrated, reproducible fine-tuning pipeline for small causal LMs."""

import os as _os
import platform as _platform

__version__ = "0.1.0"

# Same CPU numbers on every x86-64 machine. MKL and ATen pick their kernels by instruction set
# (AVX2, AVX-512, AMX), and the kernels round differently: the demo's val loss moved in the
# 5th digit between two 2-core machines, which changed dvc.lock on a fresh clone. Every stage
# imports this package before torch, so pinning both to the AVX2 code path here makes a
# teammate's or CI's rerun byte-identical. REPROTUNE_NATIVE_CPU=1 keeps the machine's fastest
# kernels (results then hold only on that CPU type). GPU kernels are not affected.
if _platform.machine().lower() in ("x86_64", "amd64") and _os.environ.get("REPROTUNE_NATIVE_CPU") != "1":
    _os.environ.setdefault("MKL_CBWR", "AVX2")
    _os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
