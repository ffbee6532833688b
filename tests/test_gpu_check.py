"""bench/gpu_check.sh's python steps, run on CPU on the tiny model (GPU_CHECK_CPU=1), so a typo
in the script or its commands cannot waste a GPU run; and its summary of missing steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # > 25 s: make test runs it, make test-fast does not
def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_CPU": "1", "OUT": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout[-4000:]
    assert "gpu_check: done" in done.stdout
    assert "varlen: torch " in (out / "env.txt").read_text()
    # the CUDA test selection names the real tests (collected here, run on a GPU)
    tests = (out / "cuda_tests.log").read_text()
    for name in ("test_cuda_pack_matches_alone", "test_cuda_lean_losses_match_stock",
                 "test_packed_and_unpacked_training_give_the_same_loss_curve",
                 "test_dpo_raises_test_reward_accuracy_and_writes_curves",
                 "test_new_methods_raise_test_reward_accuracy_and_write_curves",
                 "test_lora_sft_adapter_with_kto_and_orpo"):
        assert name in tests, tests[-2000:]
    default, lean = (io.read_json(out / f"throughput_{s}.json") for s in ("default", "lean"))
    assert list(default["runs"]) == list(lean["runs"]) == ["baseline", "full", "lora", "qlora"]
    assert default["settings"]["gradient_checkpointing"] is False
    assert lean["settings"]["gradient_checkpointing"] is True
    assert lean["settings"]["tokens_per_batch"] == default["settings"]["tokens_per_batch"] == 256
    for report in (default, lean):
        for name in ("baseline", "full", "lora"):
            assert report["runs"][name]["status"] == "ok", report["runs"][name]
            assert report["runs"][name]["tokens_per_s"] > 0
    profile = io.read_json(out / "profile_full.json")
    assert profile["method"] == "full" and profile["device_kernels"] is False
    assert 5 <= len(profile["top"]) <= 15 and profile["profiled_steps"] == 2
    shares = [r["share"] for r in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert all(r["calls"] > 0 and r["self_ms"] > 0 for r in profile["top"])
    table = (out / "profile_full.txt").read_text().splitlines()
    assert "CPU op (self CPU time; no GPU here)" in table[0] and len(table) == len(profile["top"]) + 1
    summary = io.read_json(out / "gpu_check.json")
    assert summary["steps"] == {"default": "ok", "lean": "ok", "profile": "ok"}
    assert summary["targets"]["full_tokens_per_s"]["met"] is None  # not measured on a CPU
    assert summary["targets"]["lean_full_peak_gib"]["value"] is None  # RSS is not GPU memory
    md = (out / "gpu_check.md").read_text().splitlines()
    assert len(md) == 2 + 8 and md[2].startswith("| default | baseline |")


def test_summary_says_which_steps_are_missing(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_summary

    summary = gpu_summary.summarize(tmp_path)
    assert summary["steps"] == {"default": "missing (see its log)", "lean": "missing (see its log)",
                                "profile": "missing (see its log)"}
    assert all(t["met"] is None for t in summary["targets"].values())
    assert (tmp_path / "gpu_check.json").is_file() and (tmp_path / "gpu_check.md").is_file()
