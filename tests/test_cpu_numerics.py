"""Importing reprotune pins torch's CPU kernels to the AVX2 path, so CPU metrics match across
x86-64 machines (an AVX-512 and an AVX2 machine otherwise differ in the last digits)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the pin applies to x86-64 only")

PROBE = ("import reprotune, torch; torch.manual_seed(0); a = torch.randn(67, 129); "
         "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'), "
         "(a @ a.T).sum().item())")


def _run(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY",
                                                              "REPROTUNE_NATIVE_CPU")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", "import os; " + PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.split()


def test_import_pins_avx2_path() -> None:
    cap, cbwr, _ = _run({})
    assert cap in ("AVX2", "DEFAULT")  # DEFAULT only on a CPU without AVX2
    assert cbwr == "AVX2"


def test_opt_out_and_user_setting_win() -> None:
    assert _run({"REPROTUNE_NATIVE_CPU": "1"})[1] == "None"
    assert _run({"MKL_CBWR": "COMPATIBLE"})[1] == "COMPATIBLE"


def test_same_sum_as_explicit_avx2() -> None:
    """The pinned import gives what the explicit environment gives: the pin really took."""
    assert _run({})[2] == _run({"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})[2]
