"""bench/cpu_kernels.py: portable vs native CPU kernels, on the embedded model (fast)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from bench_scripts import load_bench

from reprotune import io

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the pin applies to x86-64 only")


@pytest.mark.slow  # > 5 s: make test runs it, make test-fast does not
def test_cpu_kernels_bench_reports_both_settings_and_their_ratio(tmp_path: Path,
                                                                 tiny_base_dir: Path) -> None:
    out = tmp_path / "k.json"
    argv = ["--base", str(tiny_base_dir), "--batch", "2", "--length", "16", "--steps", "2",
            "--rounds", "2", "--out", str(out)]
    load_bench("cpu_kernels").main(argv)
    report = io.read_json(out)
    assert report["command"] == "python bench/cpu_kernels.py " + " ".join(argv)
    assert set(report["runs"]) == {"portable", "native"}
    for name, runs in report["runs"].items():
        assert len(runs) == 2 and all(len(r["cpu_s"]) == 2 for r in runs), name
    portable, native = report["runs"]["portable"][0], report["runs"]["native"][0]
    assert portable["env"]["MKL_CBWR"] == "COMPATIBLE" and portable["cpu_capability"] == "AVX2"
    assert native["env"]["MKL_CBWR"] is None and native["env"]["REPROTUNE_NATIVE_CPU"] == "1"
    # each setting repeats its bytes; the ratio is the medians' quotient
    assert report["same_bytes_within_setting"] == {"portable": True, "native": True}
    med = report["median_cpu_s_per_step"]
    assert report["portable_over_native_cpu_time"] == round(med["portable"] / med["native"], 2)
