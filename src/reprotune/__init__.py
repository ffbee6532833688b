"""reprotune: a DVC-orchestrated, reproducible fine-tuning pipeline for small causal LMs."""

import os as _os
import platform as _platform

__version__ = "0.1.0"

# Same CPU numbers on every x86-64 machine, Intel or AMD. torch's CPU kernels are chosen by
# instruction set (AVX2, AVX-512, AMX) and vendor, and they round differently: the demo's val
# loss moved in the 5th digit between machines, which changed dvc.lock on a fresh clone. MKL
# honours a code-path pin on AMD only for its COMPATIBLE branch (MKL_CBWR=AVX2 is ignored there:
# MKL_VERBOSE shows CNR:AUTO), the branch MKL documents as giving the same results on Intel and
# compatible processors; ATen is pinned to AVX2, which every x86-64 CPU of the last decade has.
# oneDNN is left alone: fp32 training does not reach it (ONEDNN_MAX_CPU_ISA changed no bit of a
# forward or backward pass), and train.mode: fast needs its native bf16 kernels. Every stage
# imports this package before torch, so the pin holds for all of them.
# REPROTUNE_NATIVE_CPU=1 keeps the machine's fastest kernels (results then hold only on that
# CPU type; cpu_kernels.py records which). GPU kernels are not affected.
PORTABLE_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
if _platform.machine().lower() in ("x86_64", "amd64") and _os.environ.get("REPROTUNE_NATIVE_CPU") != "1":
    for _key, _value in PORTABLE_ENV.items():
        _os.environ.setdefault(_key, _value)
